"""The rank plan: rank counts, the analytic cost model, the auto planner, sampling rates, process subgroups."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from radio_scale.config import load_config
from radio_scale.distributed.cost import KNOWN_TEACHERS, student_arch, student_cost, teacher_cost
from radio_scale.distributed.plan import group_active, make_plan

TWO_STAGE_GLOBAL = ["student.window_sizes=[0]", "student.activation_checkpointing=false"]


def stage2_with(*ranks, batches=None, rates=None):
    """The smoke recipe whose stage 2 has one tiny group per entry of `ranks` (count, fraction or auto)."""
    batches = batches or [2] * len(ranks)
    rates = rates or [1.0] * len(ranks)
    groups = ", ".join(
        f"{{name: g{i}, teachers: [clip], batch_per_rank: {b}, resolution: 64, ranks: {r}, sampling_rate: {s}}}"
        for i, (r, b, s) in enumerate(zip(ranks, batches, rates)))
    return load_config("smoke", [f"stages.1.groups=[{groups}]"])


def counts(plan):
    return [g.num_ranks for g in plan.groups]


# ------------------------------------------------------------------------------------------- cost model


def _meta_flops_and_params(build, size, method="forward"):
    """FLOPs (torch's counter) and parameters of a library model built on the meta device: no memory, no weights."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build()
        x = torch.empty(1, 3, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        getattr(model, method)(x)
    return counter.get_total_flops(), sum(p.numel() for p in model.parameters())


def _open_clip_visual():
    import open_clip

    return open_clip.create_model("ViT-L-14-336-quickgelu", pretrained=None, device="meta").visual


def _dinov2_giant_reg4():
    import timm

    return timm.create_model("vit_giant_patch14_reg4_dinov2", pretrained=False, img_size=224)


def _sam_vit_b():
    from segment_anything import sam_model_registry

    return sam_model_registry["vit_b"](checkpoint=None).image_encoder


@pytest.mark.parametrize("key,build,size,method", [
    (("open_clip", "ViT-L-14-336-quickgelu"), _open_clip_visual, 336, "forward"),
    (("dinov2", "vit_giant_patch14_reg4_dinov2"), _dinov2_giant_reg4, 224, "forward_features"),  # SwiGLU, registers
    (("sam", "vit_b"), _sam_vit_b, 1024, "forward"),  # windowed attention with padding, relative positions, neck
])
def test_analytic_teacher_flops_equal_torch_flop_counter_on_the_real_library_model(key, build, size, method):
    flops, params = _meta_flops_and_params(build, size, method)
    arch = KNOWN_TEACHERS[key]
    assert arch.forward_flops(size) == pytest.approx(flops, rel=0.005)
    assert arch.params == pytest.approx(params, rel=0.01)


def test_analytic_student_flops_equal_flop_counter_of_a_timm_vit_h16():
    from timm.models.vision_transformer import VisionTransformer

    def vit_h16_432():
        return VisionTransformer(img_size=432, patch_size=16, embed_dim=1280, depth=32, num_heads=16, num_classes=0)

    flops, _ = _meta_flops_and_params(vit_h16_432, 432, "forward_features")
    arch = student_arch(load_config("two_stage").student, prefix_tokens=1)
    assert arch.forward_flops(432, window_size=0) == pytest.approx(flops, rel=0.005)


def test_cost_model_reproduces_the_design_numbers_of_the_two_stage_recipe():
    cfg = load_config("two_stage")
    student = student_arch(cfg.student, prefix_tokens=1)
    assert student.forward_flops(432, 0) / 1e9 == pytest.approx(1007, rel=0.01)
    assert student.forward_flops(1024, 0) / 1e9 == pytest.approx(7913, rel=0.01)
    t = {tc.name: teacher_cost(tc).forward_flops / 1e9 for tc in cfg.teachers}
    assert t["dfn_clip"] == pytest.approx(1007, rel=0.01)
    assert t["dinov2"] == pytest.approx(599, rel=0.02)  # the recipe's reg4 variant has 4 more tokens
    assert t["sam"] == pytest.approx(5961, rel=0.01)
    assert KNOWN_TEACHERS[("open_clip", "ViT-H-14")].forward_flops(224) / 1e9 == pytest.approx(335, rel=0.01)
    # the design's per-rank step FLOPs of the paper split (it counts DFN CLIP + DINOv2 only)
    clip_dino = 32 * (3 * student.forward_flops(432, 0) + (t["dfn_clip"] + t["dinov2"]) * 1e9)
    sam = 2 * (3 * student.forward_flops(1024, 0) + t["sam"] * 1e9)
    assert clip_dino / 1e12 == pytest.approx(148, rel=0.03)
    assert sam / 1e12 == pytest.approx(59, rel=0.03)


def test_activation_checkpointing_keeps_a_tenth_of_the_student_activations():
    arch = student_cost(load_config("two_stage")).arch
    full = arch.train_activation_bytes(432, checkpointing=False)
    ckpt = arch.train_activation_bytes(432, checkpointing=True)
    tokens, d = 27 * 27 + 3, 1280
    root = 2 * tokens * (3 * 16 * 16 + d)  # patch-embedding input and output
    # 32 blocks x 32 B/token/channel without, 32 x 2 B + one recomputed block with
    assert full == pytest.approx(root + 32 * 32 * tokens * d, rel=1e-9)
    assert ckpt == pytest.approx(root + (32 * 2 + 32) * tokens * d, rel=1e-9)
    # windowed blocks keep 8 B more per token and channel of the grid padded to the window (27 -> 32)
    windowed = arch.train_activation_bytes(432, checkpointing=False, window_size=8)
    assert windowed - full == pytest.approx((32 - 4) * 8 * 32 * 32 * d, rel=1e-9)  # 4 global blocks


@pytest.mark.parametrize("width", [128, 256])
@pytest.mark.parametrize("window", [0, 8])
def test_memory_model_matches_the_bytes_the_student_saves_for_backward(width, window):
    """The planner's activation model against what autograd really keeps (bf16, like the GPU run): per image
    (batch 2 minus batch 1) and, with σReparam, the per-step effective weights; within 10 %."""
    from radio_scale.models.memory import saved_tensor_bytes
    from radio_scale.models.student import build_student

    res = 432  # a 27 x 27 grid: windows of 8 pad it to 32 x 32
    overrides = [f"student.embed_dim={width}", "student.depth=3", f"student.num_heads={width // 64}",
                 "student.cpe_grid=27", "student.global_blocks=[1]", f"student.window_sizes=[{window}]"]
    measured = {}
    for spectral in (False, True):
        cfg = load_config("smoke", overrides + [f"student.spectral_reparam={str(spectral).lower()}"])
        cost = student_cost(cfg)
        torch.manual_seed(0)
        model = build_student(cfg.student, [f"t{i}" for i in range(cost.num_summary)]).to(torch.bfloat16).train()
        one, two = (saved_tensor_bytes(model, torch.randn(b, 3, res, res, dtype=torch.bfloat16), window_size=window)
                    for b in (1, 2))
        measured[spectral] = (two - one, 2 * one - two)  # per image, per step
        model_per_image = cost.arch.train_activation_bytes(res, checkpointing=False, window_size=window)
        assert two - one == pytest.approx(model_per_image, rel=0.10), (spectral, (two - one) / model_per_image)
    sigma = measured[True][1] - measured[False][1]
    assert sigma == pytest.approx(student_cost(cfg).spectral_bytes(checkpointing=False), rel=0.10)


def test_student_flops_in_the_planner_are_the_students_own_count():
    """One FLOP model: the planner's student cost is radio_scale.models.flops (checked against FlopCounterMode),
    which pads windows after qkv; the SAM-style count (padding before qkv) would be ~11 % higher at 432 px."""
    from radio_scale.models.flops import student_forward_flops

    cfg = load_config("two_stage")
    cost = student_cost(cfg)
    for res, w in ((432, 0), (432, 8), (432, 16), (1024, 16)):
        assert cost.forward_flops(res, w) == student_forward_flops(cfg.student, res, w, cost.num_summary)
    assert cost.arch.forward_flops(432, 8) > 1.08 * cost.forward_flops(432, 8)


def test_fractions_round_to_counts_that_sum_to_the_world_size():
    assert counts(make_plan(stage2_with(0.3, 0.3, 0.4), 10, 1)) == [3, 3, 4]
    seven = counts(make_plan(stage2_with(0.3, 0.3, 0.4), 7, 1))
    assert sum(seven) == 7 and min(seven) >= 1 and seven[2] == max(seven)
    # 0.1 of 4 ranks rounds to 0: every group still gets one
    assert counts(make_plan(stage2_with(0.9, 0.1), 4, 1)) == [3, 1]


def test_counts_are_served_first_then_fractions_then_auto_in_contiguous_blocks():
    plan = make_plan(stage2_with(3, "auto", 0.25), 16, 1)
    assert counts(plan) == [3, 9, 4]
    assert [g.ranks for g in plan.groups] == [(0, 1, 2), tuple(range(3, 12)), (12, 13, 14, 15)]
    assert sorted(r for g in plan.groups for r in g.ranks) == list(range(16))


def test_rank_counts_that_do_not_match_the_world_raise_a_one_line_error():
    with pytest.raises(ValueError, match=r"stage 'stage2'.*g0=3 \+ g1=3 = 6 do not match world size 8") as e:
        make_plan(stage2_with(3, 3), 8, 1)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"stage 'stage2': group 'g1' gets no rank.*world size 8"):
        make_plan(stage2_with(8, "auto"), 8, 1)
    with pytest.raises(ValueError, match=r"stage 'stage2': rank fractions g0=0.7, g1=0.6 add up to 1.3"):
        make_plan(stage2_with(0.7, 0.6, "auto"), 8, 1)


def test_single_group_stage_takes_the_whole_world_whatever_its_count():
    plan = make_plan(load_config("two_stage"), 64, 0)  # the recipe asks for 32 ranks
    assert plan.groups[0].ranks == tuple(range(64))
    assert plan.utilisation == pytest.approx(1.0)


def test_smoke_plan_on_two_ranks_and_on_one():
    cfg = load_config("smoke")
    stage1, stage2 = make_plan(cfg, 2, 0), make_plan(cfg, 2, 1)
    assert stage1.group_of(0).ranks == stage1.group_of(1).ranks == (0, 1)
    assert stage2.group_of(0).name == "clip_dino" and stage2.group_of(0).ranks == (0,)
    assert stage2.group_of(1).name == "sam" and stage2.group_of(1).ranks == (1,)
    with pytest.raises(ValueError, match="rank 2 is outside the world of 2"):
        stage2.group_of(2)
    assert make_plan(cfg, 1, 0).group_of(0).ranks == (0,)


def test_world_smaller_than_the_groups_runs_every_group_on_the_shared_rank():
    cfg = load_config("smoke")
    plan = make_plan(cfg, 1, 1)  # resume of the 2-group stage on one process
    assert [g.name for g in plan.groups_of(0)] == ["clip_dino", "sam"]
    with pytest.raises(ValueError, match="rank 0 computes 2 groups.*use groups_of"):
        plan.group_of(0)
    # one rank does both batches in turn: nobody waits, the step is the sum of both groups' times
    assert plan.step_time_s == pytest.approx(sum(g.step_time_s for g in plan.groups))
    assert plan.utilisation == pytest.approx(1.0)
    assert plan.effective_batch == 4 + 1
    # three groups on two ranks: contiguous, in config order
    three = make_plan(stage2_with("auto", "auto", "auto"), 2, 1)
    assert [g.ranks for g in three.groups] == [(0,), (0,), (1,)]


# ------------------------------------------------------------------------------------------- utilisation


def test_paper_split_of_stage2_leaves_about_30_percent_of_rank_time_idle():
    plan = make_plan(load_config("two_stage", TWO_STAGE_GLOBAL), 64, 1)
    assert counts(plan) == [32, 32]
    assert plan.effective_batch == 32 * 32 + 32 * 2
    flops = [g.step_flops for g in plan.groups]
    assert plan.utilisation == pytest.approx(sum(32 * f for f in flops) / (64 * max(flops)), rel=1e-9)
    assert plan.utilisation == pytest.approx(0.70, abs=0.02)


def test_auto_plan_of_stage2_on_64_gpus_is_balanced_and_fits_in_memory():
    paper = make_plan(load_config("two_stage"), 64, 1)
    auto = make_plan(load_config("two_stage_auto"), 64, 1)
    assert auto.utilisation >= 0.95
    assert auto.utilisation > paper.utilisation + 0.2
    assert auto.samples_per_second > 1.3 * paper.samples_per_second
    assert sum(counts(auto)) == 64 and not auto.warnings
    assert all(g.memory_gb <= 80 for g in auto.groups)
    # the recipe's mix of samples is kept: SAM's share within ±25% of 64 of 1088
    sam = auto.group("sam")
    assert sam.expected_samples / auto.effective_batch == pytest.approx(64 / 1088, rel=0.25)
    assert auto.group("clip_dino").batch_per_rank == 32  # not tunable in the recipe


@pytest.mark.parametrize("world", [8, 16])
def test_auto_plan_beats_the_half_half_split_on_small_clusters(world):
    paper = make_plan(load_config("two_stage", TWO_STAGE_GLOBAL), world, 1)
    auto = make_plan(load_config("two_stage_auto"), world, 1)
    assert auto.utilisation >= 0.9 > paper.utilisation
    assert all(g.memory_gb <= 80 for g in auto.groups)


def test_auto_plan_switches_checkpointing_on_only_when_memory_needs_it():
    cfg = load_config("two_stage_auto")
    roomy = make_plan(cfg, 64, 1, memory_limit_gb=80)
    tight = make_plan(cfg, 64, 1, memory_limit_gb=24)
    assert not any(g.activation_checkpointing for g in roomy.groups)
    assert tight.group("clip_dino").activation_checkpointing
    assert all(g.memory_gb <= 24 for g in tight.groups) and not tight.warnings
    assert tight.goodput < tight.utilisation  # the recompute is busy time but not useful work


def test_memory_that_cannot_fit_is_reported_not_hidden():
    plan = make_plan(load_config("two_stage"), 64, 1, memory_limit_gb=4)
    assert any("over the 4 GB limit" in w for w in plan.warnings)
    assert "warning:" in plan.table()


# ------------------------------------------------------------------------------------------- sampling rate


def test_group_active_is_deterministic_and_follows_the_rate():
    draws = [group_active(7, 1, step, "sam", 0.3) for step in range(4000)]
    assert draws == [group_active(7, 1, step, "sam", 0.3) for step in range(4000)]
    assert sum(draws) / len(draws) == pytest.approx(0.3, abs=0.03)
    assert draws != [group_active(8, 1, step, "sam", 0.3) for step in range(4000)]
    assert draws != [group_active(7, 1, step, "clip_dino", 0.3) for step in range(4000)]
    assert all(group_active(7, 1, step, "sam", 1.0) for step in range(100))


def test_sampling_rate_scales_the_expected_batch_and_the_step_time():
    cfg = stage2_with(1, 1, batches=[8, 2], rates=[0.5, 1.0])
    plan = make_plan(cfg, 2, 1)
    slow, fast = plan.groups
    assert plan.effective_batch == pytest.approx(0.5 * 8 + 2)
    # half the steps wait for the slow group, the other half only for the fast one
    assert plan.step_time_s == pytest.approx(0.5 * slow.step_time_s + 0.5 * fast.step_time_s)
    busy = 0.5 * slow.step_time_s + fast.step_time_s
    assert plan.utilisation == pytest.approx(busy / (2 * plan.step_time_s))


# ------------------------------------------------------------------------------------------- output


def test_table_and_dict_describe_every_group():
    plan = make_plan(load_config("two_stage_auto"), 64, 1)
    text = plan.table()
    for g in plan.groups:
        assert g.name in text and f"{g.ranks[0]}-{g.ranks[-1]}" in text
    assert f"utilisation {plan.utilisation:.3f}" in text
    d = json.loads(json.dumps(plan.to_dict()))
    assert sum(g["num_ranks"] for g in d["groups"]) == 64
    assert d["effective_batch"] == plan.effective_batch
    # sharding "auto" is resolved by memory: on 80 GB SAM-H fits replicated (no all-gathers)
    assert d["groups"][1]["teacher_sharding"] == {"sam": "replicate"} and d["groups"][1]["teacher_comm_gb"] == 0


# ------------------------------------------------------------------------------------------- process groups


def test_build_process_groups_needs_torch_distributed():
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        make_plan(load_config("smoke"), 2, 1).build_process_groups()


def _subgroup_worker(rank, world, port, plans, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = {}
        for plan in plans:
            mine = plan.build_process_groups()
            (name, pg), = mine.items()
            x = torch.tensor([float(rank + 1)])
            dist.all_reduce(x, group=pg)
            result[plan.stage_name] = [name, x.item()]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_build_process_groups_gives_each_rank_a_working_subgroup_of_its_group(tmp_path):
    import time

    import torch.multiprocessing as mp

    cfg = load_config("smoke")
    plans = [make_plan(cfg, 2, 0), make_plan(cfg, 2, 1)]  # a plan is plain data: the ranks receive it pickled
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_subgroup_worker, args=(2, port, plans, str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    start = time.time()
    while not ctx.join(timeout=5):
        if time.time() - start > 120:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process subgroup test did not finish in 120 s")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # stage 1: one group on both ranks sums 1 + 2; stage 2: each rank alone in its group
    assert got[0]["stage1"] == got[1]["stage1"] == ["clip_dino", 3.0]
    assert got[0]["stage2"] == ["clip_dino", 1.0] and got[1]["stage2"] == ["sam", 2.0]


def test_planner_benchmark_rewrites_only_its_own_section_of_the_benchmarks_doc(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "planner_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "planner.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Data loader\n\nfast\n\n## Planner utilisation\n\nold numbers\n\n## Later\n\nkept\n")
    bench.write_section("## Planner utilisation\n\nnew numbers\n", doc)
    bench.write_section("## Planner utilisation\n\nnewer numbers\n", doc)
    text = doc.read_text()
    assert "old numbers" not in text and "new numbers" not in text and text.count("newer numbers") == 1
    assert "## Data loader\n\nfast" in text and "## Later\n\nkept" in text
    fresh = tmp_path / "fresh.md"
    bench.write_section("## Planner utilisation\n\nx\n", fresh)
    assert fresh.read_text().startswith("# Benchmarks\n\n## Planner utilisation")


# ------------------------------------------------------------------------------------------- student sharding


def _recount(cfg, plan, coupling):
    """Utilisation counted independently from the cost model: per window size, the step the ranks run."""
    from radio_scale.distributed.cost import RECOMPUTE_FORWARDS, STUDENT_TRAIN_FORWARDS

    rate = 989e12 * 0.4
    student = student_cost(cfg)
    steps, busy = [], []
    for w in cfg.student.window_sizes:
        teach, stud = [], []
        for g in plan.groups:
            k = STUDENT_TRAIN_FORWARDS + (RECOMPUTE_FORWARDS if g.activation_checkpointing else 0)
            teach.append(g.batch_per_rank * sum(teacher_cost(cfg.teacher(t)).forward_flops for t in g.teachers) / rate)
            stud.append(g.batch_per_rank * k * student.forward_flops(g.resolution, w) / rate)
        if coupling == "hybrid":
            steps.append(max(t + s for t, s in zip(teach, stud)))
        else:
            steps.append(max(teach) + max(stud))
        busy.append(sum(g.num_ranks * (t + s) for g, t, s in zip(plan.groups, teach, stud)))
    return [b / (plan.world_size * s) for b, s in zip(busy, steps)], sum(busy) / (plan.world_size * sum(steps))


@pytest.mark.parametrize("coupling", ["world", "hybrid"])
def test_utilisation_is_the_step_the_ranks_run_per_window(coupling):
    cfg = load_config("two_stage_auto")
    plan = make_plan(cfg, 64, 1, student_sharding=coupling)
    per_window, averaged = _recount(cfg, plan, coupling)
    assert plan.student_sharding == coupling
    assert [u for _, u in plan.utilisation_per_window] == pytest.approx(per_window, rel=1e-9)
    assert plan.utilisation == pytest.approx(averaged, rel=1e-9)
    if coupling == "hybrid":  # every group owns whole nodes (shard groups of 8)
        assert all(g.num_ranks % 8 == 0 and g.ranks[0] % 8 == 0 for g in plan.groups)


def test_auto_picks_hsdp_on_64_gpus_and_world_fsdp_where_hsdp_cannot_balance():
    cfg = load_config("two_stage_auto")
    world = make_plan(cfg, 64, 1, student_sharding="world")
    auto = make_plan(cfg, 64, 1)
    assert auto.student_sharding == "hybrid" and auto.shard_group_size == 8
    assert auto.utilisation >= 0.95 > world.utilisation  # the world mesh couples the groups at every block
    # the student's fp32 state is sharded over 8 ranks, not 64: more memory per rank, still within 80 GB
    assert auto.group("clip_dino").memory_breakdown_gb["student_states"] > world.group("clip_dino").memory_breakdown_gb["student_states"]
    assert all(g.memory_gb <= 80 for g in auto.groups)
    # 16 GPUs = 2 nodes: HSDP could only split 8/8, far from balanced; auto keeps world FSDP
    assert make_plan(cfg, 16, 1).student_sharding == "world"
    # one node: nothing to replicate
    assert make_plan(cfg, 8, 1).student_sharding == "world"


def test_hybrid_sharding_that_cannot_run_is_a_one_line_error_naming_the_key():
    cfg = load_config("two_stage", ["parallel.student_sharding=hybrid", "stages.1.groups.0.ranks=36",
                                    "stages.1.groups.1.ranks=28"])
    with pytest.raises(ValueError, match=r"parallel.student_sharding.*stages.1.groups.0.ranks.*36.*multiple of the shard group size 8"):
        make_plan(cfg, 64, 1)
    ok = load_config("two_stage", ["parallel.student_sharding=hybrid"])
    assert make_plan(ok, 64, 1).student_sharding == "hybrid"
    with pytest.raises(ValueError, match="not a multiple of the shard group size 8"):
        make_plan(ok, 60, 1)
    # a shard group as large as the world is world FSDP
    assert make_plan(ok, 8, 1).student_sharding == "world"

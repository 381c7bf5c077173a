"""The student registry (issue 14): ViT presets, E-RADIO and timm:<name> students under one contract."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from radio_scale.config import ConfigError, load_config
from radio_scale.config.loader import validate
from radio_scale.models.eradio import ERADIO_PRESETS, ERadioStudent, WindowBlock
from radio_scale.models.registry import build_any_student, build_meta_student, student_figures

TEACHERS = ["clip", "dino"]

# tiny members of each family the paper's Table 6 compares (pretrained=False, nothing downloaded)
TIMM_TINY = {
    "tf_efficientnetv2_b0": {},
    "resnetv2_18": {},
    "regnety_002": {},
    "convnext_atto": {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]},
    "efficientvit_b0": {"widths": [8, 16, 32, 64, 128], "depths": [1, 1, 1, 1, 1], "head_dim": 16},
    "swinv2_tiny_window8_256": {"img_size": 64, "window_size": 4, "embed_dim": 16, "depths": [1, 1, 1, 1],
                                "num_heads": [1, 1, 2, 2]},
    "maxvit_pico_rw_256": {"img_size": 64},
}


def student_cfg(arch: str, **kw):
    return dataclasses.replace(load_config("smoke").student, arch=arch, **kw)


def run_cfg(arch: str, **kw):
    cfg = load_config("smoke")
    return dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, arch=arch, **kw))


@pytest.mark.parametrize("arch", ["vit_pico16", "eradio_pico", "eradio_pico_noup", "timm:convnext_atto"])
def test_every_student_keeps_the_contract(arch):
    kw = {"timm_kwargs": TIMM_TINY["convnext_atto"]} if arch.startswith("timm:") else {}
    torch.manual_seed(0)
    student = build_any_student(student_cfg(arch, **kw), TEACHERS)
    stride = student.patch_size
    assert student.blocks and all(isinstance(b, torch.nn.Module) for b in student.blocks)
    student.cpe.generator = torch.Generator().manual_seed(0)  # what the trainer does
    student.set_spectral_advance(False)
    for side in (64, 96, 128):
        out = student(torch.randn(2, 3, side, side))
        assert set(out.summary) == set(TEACHERS)
        assert all(v.shape == (2, student.embed_dim) for v in out.summary.values())
        assert out.patches.shape == (2, student.embed_dim, side // stride, side // stride)
    # activation checkpointing per wrap unit changes neither outputs nor gradients
    student.eval()  # BatchNorm statistics fixed, so the two passes compute the same function
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for on in (False, True):
        student.zero_grad()
        student.set_activation_checkpointing(on)
        out = student(x)
        (out.patches.square().mean() + sum(v.square().mean() for v in out.summary.values())).backward()
        grads.append([p.grad.clone() for p in student.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


@pytest.mark.parametrize("arch,paper_m", [("eradio_b", 118), ("eradio_b_noup", 113), ("eradio_l", 265)])
def test_eradio_sizes_match_the_paper(arch, paper_m):
    student = build_meta_student(student_cfg(arch), TEACHERS)
    params = student.param_count()
    assert abs(params / 1e6 - paper_m) / paper_m < 0.10, params
    assert student.patch_size == (32 if arch.endswith("_noup") else 16)


@pytest.mark.parametrize("side", [64, 96, 128])
def test_eradio_flops_equal_the_flop_counter(side):
    torch.manual_seed(0)
    student = ERadioStudent(ERADIO_PRESETS["eradio_pico"], TEACHERS).eval()
    # SDPA on CPU runs a fused kernel FlopCounterMode does not count: the math backend decomposes it into matmuls
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad(), FlopCounterMode(display=False) as counter:
        student(torch.randn(1, 3, side, side))
    assert student.forward_flops(side) == counter.get_total_flops() > 0


def _corner_effect(block: WindowBlock, side: int) -> float:
    torch.manual_seed(0)
    x = torch.randn(1, block.attn.qkv.in_features, side, side)
    y = x.clone()
    y[:, :, 0, 0] += 10.0  # perturb the top-left corner
    with torch.no_grad():
        return (block(y) - block(x))[:, :, -1, -1].abs().max().item()  # look at the bottom-right corner


def test_global_blocks_attend_across_windows_local_blocks_do_not():
    torch.manual_seed(0)
    local = WindowBlock(32, 2, window=4, is_global=False)
    glob = WindowBlock(32, 2, window=4, is_global=True)
    glob.load_state_dict(local.state_dict())  # same weights: only the attention pattern differs
    assert _corner_effect(local, 8) == 0.0  # 8x8 map = 2x2 windows of 4: corners never meet
    assert _corner_effect(glob, 8) > 1e-4  # pooled to 4x4 = one window: the corner reaches the opposite one
    # and in the full model, stage 3 alternates local (even) and global (odd) blocks
    pico = ERadioStudent(ERADIO_PRESETS["eradio_pico"], TEACHERS)
    assert [b.inner.is_global for b in pico.stage3] == [False, True]


@pytest.mark.parametrize("name", list(TIMM_TINY))
def test_timm_students_train_and_export(name, tmp_path):
    from radio_scale.eval.loading import load_student
    from radio_scale.train.export import export_student
    from radio_scale.train.trainer import build_model

    cfg = run_cfg(f"timm:{name}", timm_kwargs=TIMM_TINY[name])
    validate(cfg, "test")
    model, specs = build_model(cfg)
    student = model.student
    assert student.blocks, "no FSDP2 wrap units found"
    # the student's own FLOP figure (meta device) is what FlopCounterMode counts on the real model
    student.eval()
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad(), FlopCounterMode(display=False) as counter:
        student(torch.randn(1, 3, 64, 64))
    assert student.forward_flops(64) == counter.get_total_flops() > 0
    assert 0 < student.train_activation_bytes(64, True) < student.train_activation_bytes(64, False)
    student.train()
    x = torch.randn(2, 3, 64, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    preds = model(x)
    loss = sum(t.float().square().mean() for p in preds.values() for t in p
               if isinstance(t, torch.Tensor))
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    out = export_student(model, cfg, specs, tmp_path / "export", is_main=True)
    loaded, _heads, cfg2 = load_student(out)
    student.eval()
    with torch.no_grad():
        a, b = student(x), loaded(x)
    assert cfg2.student.arch == f"timm:{name}"
    assert torch.allclose(a.patches, b.patches, atol=1e-5)
    assert all(torch.allclose(a.summary[k], b.summary[k], atol=1e-5) for k in a.summary)


def test_config_names_the_student_arch():
    validate(run_cfg("eradio_b"), "test")
    validate(run_cfg("timm:convnext_atto", timm_kwargs={"dims": [16, 32, 64, 128]}), "test")
    with pytest.raises(ConfigError, match="student.arch"):
        validate(run_cfg("eradio_xxl"), "test")
    with pytest.raises(ConfigError, match="timm has no model"):
        validate(run_cfg("timm:no_such_model_xyz"), "test")
    with pytest.raises(ConfigError, match="student.timm_kwargs"):
        validate(run_cfg("vit_pico16", timm_kwargs={"depth": 2}), "test")
    with pytest.raises(ConfigError, match="student.timm_kwargs"):
        validate(run_cfg("timm:convnext_atto", timm_kwargs={"no_such_kwarg": 1}), "test")
    # resolutions are checked against the student's own stride (E-RADIO 16, 32 without upsampling)
    from radio_scale.config import load_config as load

    load("smoke", ["student.arch=eradio_pico", "stages.1.groups.0.resolution=80"])
    with pytest.raises(ConfigError, match="resolution"):
        load("smoke", ["student.arch=eradio_pico_noup", "stages.1.groups.0.resolution=80"])


def test_planner_uses_the_students_own_figures():
    from radio_scale.distributed.cost import student_cost
    from radio_scale.distributed.plan import make_plan

    cfg = run_cfg("eradio_pico")
    cost = student_cost(cfg)
    built = build_any_student(cfg.student, ["clip", "dino", "effnet"])
    assert cost.arch.params == built.param_count()
    assert cost.forward_flops(96, 0) == built.forward_flops(96)
    figs = student_figures(cfg.student, 3, 96)
    assert 0 < figs.act_bytes_ckpt < figs.act_bytes
    assert cost.arch.train_activation_bytes(96, True) == figs.act_bytes_ckpt
    assert cost.state_bytes(2) > 0
    plan = make_plan(cfg, world_size=2, stage_index=1)
    assert plan is not None


# -- through the system: radio-launch on one rank, and two FSDP2 ranks with E-RADIO -------------------------------


def _check_finished(run_dir, steps):
    from launch_helpers import events, metrics

    from radio_scale.eval.loading import load_student

    assert events(run_dir)[-1]["kind"] == "finished"
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, steps + 1))
    student, heads, cfg = load_student(run_dir / "export")
    with torch.no_grad():
        out = student(torch.randn(1, 3, 64, 64))
    assert out.patches.shape[1] == student.embed_dim and set(out.summary) == {"clip", "dino", "effnet"}
    return cfg


def _launch_and_check(tmp_path, arch_overrides, tasks):
    from launch_helpers import FAST, one_node_cluster, run_launch

    run_dir = tmp_path / "run"
    overrides = [*FAST, "stages.0.steps=2", "stages.1.steps=2", "checkpoint.every=2", *arch_overrides]
    r = run_launch(run_dir, overrides, cluster=one_node_cluster(tmp_path, tasks))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return _check_finished(run_dir, 4)


# Kill-and-resume runs: 2 steps of stage 1 and 4 of stage 2, a checkpoint every 2 (steps 2, 4, 6). Rank 0 is
# killed (SIGKILL) while writing step 6: the relaunch resumes from step 4, in the middle of stage 2.
RESUME_RUN = ["stages.0.steps=2", "stages.1.steps=4", "checkpoint.every=2", "checkpoint.keep=10",
              "data.num_workers=1", "monitor.hang_timeout_s=120"]
RESUME_STEPS, KILL_AT = 6, 6
ERADIO_RUN = [*RESUME_RUN, "student.arch=eradio_pico", "student.activation_checkpointing=true"]
TIMM_RUN = [*RESUME_RUN, "student.arch=timm:convnext_atto",
            "student.timm_kwargs={depths: [1, 1, 1, 1], dims: [16, 32, 64, 128]}"]


def _reference_run(tmp_path_factory, name, overrides, tasks):
    from launch_helpers import one_node_cluster, run_launch

    base = tmp_path_factory.mktemp(name)
    run_dir = base / "run"
    r = run_launch(run_dir, overrides, cluster=one_node_cluster(base, tasks))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return run_dir


@pytest.fixture(scope="module")
def eradio_two_rank_run(tmp_path_factory):
    """One uninterrupted two-rank FSDP2 run with an E-RADIO student (activation checkpointing on)."""
    return _reference_run(tmp_path_factory, "eradio2", ERADIO_RUN, 2)


@pytest.fixture(scope="module")
def timm_one_rank_run(tmp_path_factory):
    """One uninterrupted one-rank run with a timm ConvNeXt student."""
    return _reference_run(tmp_path_factory, "timm1", TIMM_RUN, 1)


def test_one_rank_run_with_a_timm_student_finishes_and_exports(timm_one_rank_run):
    cfg = _check_finished(timm_one_rank_run, RESUME_STEPS)
    assert cfg.student.timm_kwargs["dims"] == [16, 32, 64, 128]


def test_two_rank_fsdp2_run_with_an_eradio_student_finishes_and_exports(eradio_two_rank_run):
    cfg = _check_finished(eradio_two_rank_run, RESUME_STEPS)
    assert cfg.student.arch == "eradio_pico"


def test_two_rank_eradio_run_resumes_bit_exactly_after_kill_9(eradio_two_rank_run, tmp_path):
    """Rank 0 of a two-rank FSDP2 E-RADIO run (BatchNorm statistics, C2f stages, windowed attention) is killed
    mid-save; the relaunch resumes mid-stage and its export and logged losses equal the uninterrupted run's."""
    from launch_helpers import assert_same_run, kill_in_checkpoint_then_relaunch, one_node_cluster

    at = kill_in_checkpoint_then_relaunch(tmp_path / "killed", ERADIO_RUN, KILL_AT,
                                          cluster=one_node_cluster(tmp_path, 2))
    assert at == 4
    assert_same_run(eradio_two_rank_run, tmp_path / "killed")


def test_one_rank_timm_run_resumes_bit_exactly_after_kill_9(timm_one_rank_run, tmp_path):
    from launch_helpers import assert_same_run, kill_in_checkpoint_then_relaunch, one_node_cluster

    at = kill_in_checkpoint_then_relaunch(tmp_path / "killed", TIMM_RUN, KILL_AT,
                                          cluster=one_node_cluster(tmp_path, 1))
    assert at == 4
    assert_same_run(timm_one_rank_run, tmp_path / "killed")


@pytest.mark.parametrize("arch,kw", [("eradio_pico", {}), ("timm:regnety_002", {})])
def test_batchnorm_students_take_bf16_parameters_with_fp32_statistics(arch, kw):
    # FSDP2's bf16 policy hands BatchNorm bf16 weights while its running statistics stay fp32 buffers
    student = build_any_student(student_cfg(arch, timm_kwargs=kw), TEACHERS)
    for p in student.parameters():
        p.data = p.data.bfloat16()
    out = student(torch.randn(2, 3, 64, 64).bfloat16())
    out.patches.float().mean().backward()
    bns = [m for m in student.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(m.running_mean.dtype == torch.float32 and m.running_mean.abs().sum() > 0 for m in bns)
    assert out.patches.dtype == torch.bfloat16


def test_one_rank_bf16_fsdp2_eradio_run_finishes_and_exports(tmp_path):
    # bf16 at world size 1 goes through FSDP2's bf16 policy: BatchNorm with bf16 weights, checkpointed units
    _launch_and_check(tmp_path, ["student.arch=eradio_pico", "precision=bf16",
                                 "student.activation_checkpointing=true"], 1)


def test_radio_eval_throughput_uses_the_students_own_flops():
    from radio_scale.eval.throughput import flop_crosscheck

    student = build_any_student(student_cfg("eradio_pico"), TEACHERS).eval()
    check = flop_crosscheck(student, student_cfg("eradio_pico"), 96, len(TEACHERS))
    assert check["analytic_gflops"] == student.forward_flops(96) / 1e9 and check["rel_diff"] == 0.0


@pytest.mark.parametrize("name", ["convnext_atto", "efficientvit_b0", "regnety_002"])
def test_timm_students_keep_no_parameter_that_never_gets_a_gradient(name):
    # a parameter without a gradient gets no optimizer state, and a checkpoint without it cannot be resumed;
    # what is left of the classifier head (ConvNeXt's head.norm) is removed, the same way under no_grad (loading)
    cfg = student_cfg(f"timm:{name}", timm_kwargs=TIMM_TINY.get(name, {}))
    torch.manual_seed(0)
    student = build_any_student(cfg, TEACHERS)
    with torch.no_grad():
        loaded = build_any_student(cfg, TEACHERS)
    assert student.state_dict().keys() == loaded.state_dict().keys()
    out = student(torch.randn(2, 3, 64, 64))
    (out.patches.mean() + sum(v.mean() for v in out.summary.values())).backward()
    assert [n for n, p in student.named_parameters() if p.grad is None] == []
    if name == "convnext_atto":
        assert student.pruned == ("head",)

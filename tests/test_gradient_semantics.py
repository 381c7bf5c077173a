"""Two teacher groups with unequal batch sizes on two processes give the gradient of the paper's objective.

The objective (loss.reduction: per_teacher) is, for every teacher, the mean of its per-sample terms over the
samples that carried it in the step (all ranks), weighted by λ_i / γ_i; per_sample divides every term by the
step's global sample count instead. The reference computes either in one process from the same batches.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from radio_scale.config import load_config
from radio_scale.losses import crop_to_content, spatial_loss, summary_loss
from radio_scale.teachers import build_teacher
from radio_scale.train.trainer import build_model, loss_weights

WORKER = Path(__file__).parent / "workers" / "grad_worker.py"
# Deterministic student forward for the reference: whole position grid (no CPE crop), global attention.
OVERRIDES = [
    "student.cpe_scale=[1.0, 1.0]", "student.cpe_ratio=[1.0, 1.0]", "student.window_sizes=[0]",
    "stages.1.groups.0.batch_per_rank=3", "stages.1.groups.1.batch_per_rank=1",  # 3 CLIP-group vs 1 SAM image
    "data.num_workers=0", "optim.grad_clip=1e9",  # compare raw gradients (clipping scales them all)
    # the ranks recompute activations (inside FSDP2 units); the single-process reference keeps them
    # (fixed rank counts: with `auto` the planner drops checkpointing where memory allows)
    "student.activation_checkpointing=true", "stages.1.groups.0.ranks=1", "stages.1.groups.1.ranks=1",
    # σReparam on: its power iteration advances once per step on every rank (the reference does the same)
    "student.spectral_reparam=true",
    # crops of every aspect ratio, so SAM's padded view really has padding to crop away
    "data.crop_ratio=[0.5, 2.0]",
]


def run_torchrun(nprocs: int, script: Path, args: list[str], timeout: int = 600) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", RADIO_THREADS_PER_RANK="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nprocs), str(script), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]


def reference_grads(cfg, batches_per_rank, reduction):
    """Single process, the objective written out: Σ_terms w_k · mean of term k over the samples that carried it
    (per_teacher), or Σ_terms w_k · Σ term k / all samples (per_sample)."""
    model, specs = build_model(cfg)
    teachers = {t.name: build_teacher(t) for t in cfg.teachers}
    weights = {k: float(v) for k, v in loss_weights(model.balancer)[0].items()}
    per_term: dict[str, list] = {}
    n_samples = 0
    first = True
    for rank_batches in batches_per_rank:
        for group_name, b in rank_batches.items():
            group = next(g for g in cfg.stages[1].groups if g.name == group_name)
            model.student.set_spectral_advance(first)  # σ advances once per step, as on the ranks
            first = False
            out = model.student(b["student"], window_size=0)
            preds = model.heads(out)
            n_samples += b["student"].shape[0]
            for t in group.teachers:
                with torch.no_grad():
                    tgt = teachers[t](b["teachers"][t])
                if preds[t].summary is not None and tgt.summary is not None:
                    per_term.setdefault(f"{t}/summary", []).append(summary_loss(preds[t].summary, tgt.summary))
                target_map = crop_to_content(tgt.spatial, b["content"].get(t))
                per_term.setdefault(f"{t}/spatial", []).append(
                    spatial_loss(preds[t].spatial, target_map, cfg.loss.alpha, cfg.loss.beta))
    loss = torch.zeros(())
    for k, parts in per_term.items():
        v = torch.cat(parts)
        loss = loss + weights[k] * (v.mean() if reduction == "per_teacher" else v.sum() / n_samples)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, n_samples


@pytest.mark.parametrize("reduction", ["per_teacher", "per_sample"])
def test_two_groups_unequal_batches_match_single_process_reference(tmp_path, reduction):
    overrides = [*OVERRIDES, f"loss.reduction={reduction}"]
    out = tmp_path / "grads.pt"
    run_torchrun(2, WORKER, [str(out), str(tmp_path / "run"), *overrides])
    got = torch.load(out, weights_only=False)
    assert got["checkpointing"] and all(got["checkpointing"])  # the plan's choice reached every block
    sam_content = [b["sam"]["content"]["sam"] for b in got["batches"] if "sam" in b]
    assert sam_content and bool((torch.cat(sam_content) < 1).any()), "the SAM sample must have padding"
    cfg = load_config("smoke", overrides)
    ref, n = reference_grads(cfg, got["batches"], reduction)
    assert n == 4  # 3 + 1 samples in the union
    student_grads = [k for k in ref if k.startswith("student.")]
    assert len(student_grads) > 10 and any(k.endswith(".gamma") for k in student_grads)  # σReparam is on
    for name, g in ref.items():
        assert name in got["grads"], name
        torch.testing.assert_close(got["grads"][name], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    # SAM's weight in the objective: the single SAM image carries SAM's whole term under per_teacher (γ = 1),
    # a quarter of it under per_sample (1 of 4 samples). A 2x, 4x or 17x error in SAM's weight must show.
    sam_w = [k for k in ref if k.startswith("heads.spatial.sam.")][0]
    assert torch.allclose(got["grads"][sam_w], ref[sam_w], atol=1e-6, rtol=1e-4)
    for wrong in (2.0, 4.0, 0.25, 17.0, 1 / 17):
        assert not torch.allclose(got["grads"][sam_w], wrong * ref[sam_w], atol=1e-7, rtol=1e-3)


# 4 ranks as 2 "nodes" of 2: each teacher group owns one node (one HSDP shard group)
TWO_NODES = [o for o in OVERRIDES if not o.startswith("stages.1.groups.")] + [
    "stages.1.groups.0.batch_per_rank=3", "stages.1.groups.1.batch_per_rank=1",
    "stages.1.groups.0.ranks=2", "stages.1.groups.1.ranks=2", "hardware.ranks_per_node=2"]


def test_hsdp_on_two_nodes_gives_the_reference_gradients_and_those_of_world_fsdp(tmp_path):
    """parallel.student_sharding hybrid (FSDP2 on a 2 x 2 mesh: sharded within a node, replicated across) and
    world (one 4-rank mesh): both give the single-process reference's gradients for the same 8 samples."""
    got = {}
    for mode in ("hybrid", "world"):
        out = tmp_path / f"{mode}.pt"
        run_torchrun(4, WORKER, [str(out), str(tmp_path / mode), *TWO_NODES, f"parallel.student_sharding={mode}"])
        got[mode] = torch.load(out, weights_only=False)
    assert got["hybrid"]["sharding"] == "hybrid" and got["hybrid"]["mesh"] == (2, 2)
    assert got["world"]["sharding"] == "world" and got["world"]["mesh"] == (4,)
    cfg = load_config("smoke", TWO_NODES)
    ref, n = reference_grads(cfg, got["hybrid"]["batches"], "per_teacher")
    assert n == 3 + 3 + 1 + 1
    assert got["world"]["batches"][3]["sam"]["student"].equal(got["hybrid"]["batches"][3]["sam"]["student"])
    for name, g in ref.items():
        for mode in ("hybrid", "world"):
            torch.testing.assert_close(got[mode]["grads"][name], g, atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"{mode} {name}: {m}")
        torch.testing.assert_close(got["hybrid"]["grads"][name], got["world"]["grads"][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_stages_match_the_same_single_process_reference(tmp_path, stage):
    """distributed_backend deepspeed (one ZeRO engine for student + heads + balancer over the world): the same
    two unequal groups, σReparam and activation checkpointing on, give the reference's gradients at every stage."""
    overrides = [*OVERRIDES, "loss.reduction=per_teacher", "distributed_backend=deepspeed",
                 f"deepspeed.zero_stage={stage}"]
    out = tmp_path / "grads.pt"
    run_torchrun(2, WORKER, [str(out), str(tmp_path / "run"), *overrides])
    got = torch.load(out, weights_only=False)
    assert got["checkpointing"] and all(got["checkpointing"])
    cfg = load_config("smoke", [*OVERRIDES, "loss.reduction=per_teacher"])
    ref, n = reference_grads(cfg, got["batches"], "per_teacher")
    assert n == 4 and set(ref) <= set(got["grads"])
    for name, g in ref.items():
        torch.testing.assert_close(got["grads"][name], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"ZeRO-{stage} {name}: {m}")
    sam_w = [k for k in ref if k.startswith("heads.spatial.sam.")][0]
    for wrong in (2.0, 0.5):
        assert not torch.allclose(got["grads"][sam_w], wrong * ref[sam_w], atol=1e-7, rtol=1e-3)

"""Two teacher groups with unequal batch sizes on two processes give the gradient of the global per-sample mean."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from radio_scale.config import load_config
from radio_scale.losses import spatial_loss, summary_loss
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
]


def run_torchrun(nprocs: int, script: Path, args: list[str], timeout: int = 600) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", RADIO_THREADS_PER_RANK="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nprocs), str(script), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]


def reference_grads(cfg, batches_per_rank):
    """Single process: mean over the union of every rank's samples of each sample's weighted loss terms."""
    model, specs = build_model(cfg)
    teachers = {t.name: build_teacher(t) for t in cfg.teachers}
    weights = {k: float(v) for k, v in loss_weights(model.balancer)[0].items()}
    per_sample = []
    for rank_batches in batches_per_rank:
        for group_name, b in rank_batches.items():
            group = next(g for g in cfg.stages[1].groups if g.name == group_name)
            out = model.student(b["student"], window_size=0)
            preds = model.heads(out)
            total = torch.zeros(b["student"].shape[0])
            for t in group.teachers:
                with torch.no_grad():
                    tgt = teachers[t](b["teachers"][t])
                if preds[t].summary is not None and tgt.summary is not None:
                    total = total + weights[f"{t}/summary"] * summary_loss(preds[t].summary, tgt.summary)
                total = total + weights[f"{t}/spatial"] * spatial_loss(preds[t].spatial, tgt.spatial, cfg.loss.alpha, cfg.loss.beta)
            per_sample.append(total)
    loss = torch.cat(per_sample).mean()
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, len(torch.cat(per_sample))


def test_two_groups_unequal_batches_match_single_process_reference(tmp_path):
    out = tmp_path / "grads.pt"
    run_torchrun(2, WORKER, [str(out), str(tmp_path / "run"), *OVERRIDES])
    got = torch.load(out, weights_only=False)
    assert got["checkpointing"] and all(got["checkpointing"])  # the plan's choice reached every block
    cfg = load_config("smoke", OVERRIDES)
    ref, n = reference_grads(cfg, got["batches"])
    assert n == 4  # 3 + 1 samples in the union
    student_grads = [k for k in ref if k.startswith("student.")]
    assert len(student_grads) > 10
    for name, g in ref.items():
        assert name in got["grads"], name
        torch.testing.assert_close(got["grads"][name], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    # Plain averaging over ranks would weigh the single SAM image like the three CLIP-group images together:
    # the SAM head's gradient would be 2x too large relative to the union mean. Make sure that is not what we do.
    sam_w = [k for k in ref if k.startswith("heads.spatial.sam.")][0]
    assert torch.allclose(got["grads"][sam_w], ref[sam_w], atol=1e-6, rtol=1e-4)
    assert not torch.allclose(got["grads"][sam_w], 2 * ref[sam_w], atol=1e-7, rtol=1e-3)

"""One rank (a world of 1, gloo): precision and unused-head checks on the real Trainer; writes a JSON report."""
import json
import sys

import torch

from radio_scale.config import load_config
from radio_scale.distributed.env import init_distributed, shutdown
from radio_scale.train.trainer import Trainer


def bf16(run_dir: str) -> dict:
    """precision=bf16 at world size 1: the student computes in bf16 (FSDP2 policy), the teachers too."""
    cfg = load_config("smoke", ["precision=bf16", "data.num_workers=0", "stages.0.groups.0.batch_per_rank=2",
                                "stages.0.groups.0.teachers=[clip, dino]"])
    env = init_distributed(timeout_s=120)
    trainer = Trainer(cfg, env, run_dir)
    trainer._enter_stage(0)
    seen = []
    qkv = trainer.model.student.blocks[0].attn.qkv
    qkv.register_forward_hook(lambda m, i, o: seen.append([str(i[0].dtype), str(m.weight.dtype), str(o.dtype)]))
    stats = trainer.train_step()
    master = {str(p.dtype) for p in trainer.model.parameters()}
    report = {"student_compute": seen, "master_dtypes": sorted(master), "finite": stats.finite, "loss": stats.loss,
              "teacher_dtypes": {n: str(next(t.parameters()).dtype) for n, t in trainer.stage.teachers.items()}}
    # the blanket bf16 copy of a teacher against FSDP2's bf16 parameter policy on the same weights and images
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from radio_scale.distributed.parallel import world_mesh
    from radio_scale.teachers import build_teacher

    images = torch.randn(2, 3, 56, 56)
    blanket = build_teacher(cfg.teacher("dino")).to(torch.bfloat16)
    policy = build_teacher(cfg.teacher("dino"))
    fully_shard(policy, mesh=world_mesh(torch.device("cpu")),
                mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    with torch.no_grad():
        a, b = blanket(images), policy(images.to(torch.bfloat16))
    report["teacher_blanket_vs_policy"] = {
        "summary_max_abs": float((a.summary.float() - b.summary.float()).abs().max()),
        "spatial_max_abs": float((a.spatial.float() - b.spatial.float()).abs().max()),
        "spatial_scale": float(b.spatial.float().abs().max())}
    trainer.stage.close()
    return report


def unused_inf(run_dir: str) -> dict:
    """Stage 0 has no SAM group: SAM's heads are unused everywhere. An overflowing SAM head must not skip the step."""
    cfg = load_config("smoke", ["data.num_workers=0", "stages.0.groups.0.batch_per_rank=2"])
    env = init_distributed(timeout_s=120)
    trainer = Trainer(cfg, env, run_dir)
    trainer._enter_stage(0)
    with torch.no_grad():
        trainer.model.heads.spatial["sam"][-1].bias.fill_(float("inf"))
    calls = []
    trainer.model.heads.spatial["clip"].register_forward_hook(lambda m, i, o: calls.append(("clip", tuple(i[0].shape))))
    trainer.model.heads.spatial["sam"].register_forward_hook(lambda m, i, o: calls.append(("sam", tuple(i[0].shape))))
    before = trainer.model.heads.spatial["clip"][0].weight.detach().clone()
    stats = trainer.train_step(apply=False)
    sam_grads = [float(p.grad.abs().max()) for p in trainer.model.heads.spatial["sam"].parameters()]
    trainer.optimizer.zero_grad(set_to_none=True)
    stats2 = trainer.train_step()
    moved = float((trainer.model.heads.spatial["clip"][0].weight.detach() - before).abs().max())
    trainer.stage.close()
    return {"finite": [stats.finite, stats2.finite], "loss": stats.loss, "grad_norm": stats.grad_norm,
            "sam_head_grad_max": sam_grads, "clip_head_moved": moved, "head_inputs": calls}


def phi_s(run_dir: str) -> dict:
    """loss.standardize=phi_s on one rank: estimated at stage entry, heads learn standardised targets, the export
    bakes the inverse so the exported heads equal the live heads mapped back to the teachers' spaces."""
    from pathlib import Path

    from radio_scale.eval.loading import load_student
    from radio_scale.train.export import export_student
    from radio_scale.train.trainer import to_teacher_space

    cfg = load_config("smoke", ["loss.standardize=phi_s", "data.num_workers=0", "loss.standardize_batches=6"])
    env = init_distributed(timeout_s=120)
    trainer = Trainer(cfg, env, run_dir)
    trainer._enter_stage(0)
    std = trainer.model.standardizer
    ready = {t: std.is_ready(t) for t in std.terms}
    mean, tx, inv = (t.double() for t in std.parts("dino/spatial"))
    c = tx.shape[0]
    gram = tx @ tx.T
    scale2 = float(gram.diagonal().mean())
    stats = trainer.train_step()
    trainer.model.eval()
    torch.manual_seed(0)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        live = to_teacher_space(trainer.model(x), std)
    out = export_student(trainer.model, cfg, trainer.specs, Path(run_dir) / "export", True)
    student, heads, _ = load_student(out)
    with torch.no_grad():
        exported = heads(student(x))
    diffs = {}
    for n in live:
        if live[n].summary is not None:
            diffs[f"{n}/summary"] = float((live[n].summary - exported[n].summary).abs().max())
        diffs[f"{n}/spatial"] = float((live[n].spatial - exported[n].spatial).abs().max())
    trainer.stage.close()
    return {"ready": ready, "orthogonality": float((gram / scale2 - torch.eye(c, dtype=gram.dtype)).abs().max()),
            "inverse": float((inv @ tx - torch.eye(c, dtype=tx.dtype)).abs().max()), "finite": stats.finite,
            "terms": stats.terms, "export_vs_live": diffs}


if __name__ == "__main__":
    mode, out, run_dir = sys.argv[1:4]
    try:
        report = {"bf16": bf16, "unused_inf": unused_inf, "phi_s": phi_s}[mode](run_dir)
    finally:
        shutdown()
    with open(out, "w") as f:
        json.dump(report, f)

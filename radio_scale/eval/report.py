"""Evaluation reports: results as tables (task -> row -> metric), written as JSON + markdown, logged to MLflow."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

Table = dict[str, dict[str, float]]  # row (student / teacher / head name) -> metric -> value


@dataclass
class EvalReport:
    """Results of one evaluation of one model: per task a table of rows x metrics, plus free-form metadata."""

    model: str
    results: dict[str, Table] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, task: str, table: Mapping[str, Mapping[str, float]]) -> None:
        """Add (or extend) the table of one task."""
        rows = self.results.setdefault(task, {})
        for row, metrics in table.items():
            rows.setdefault(row, {}).update({k: float(v) for k, v in metrics.items()})

    def flat(self, prefix: str = "eval/") -> dict[str, float]:
        """{'eval/<task>/<row>/<metric>': value} for metric loggers."""
        return {f"{prefix}{task}/{row}/{metric}": v
                for task, rows in self.results.items() for row, metrics in rows.items() for metric, v in metrics.items()}

    def to_dict(self) -> dict:
        """JSON-ready dict (NaN becomes null)."""
        clean = {t: {r: {m: (None if isinstance(v, float) and math.isnan(v) else v) for m, v in ms.items()}
                     for r, ms in rows.items()} for t, rows in self.results.items()}
        return {"model": self.model, "meta": self.meta, "results": clean}

    def to_markdown(self) -> str:
        """One markdown table per task, rows x metrics."""
        lines = [f"# Evaluation of `{self.model}`", ""]
        for k, v in self.meta.items():
            lines.append(f"- {k}: {v}")
        for task, rows in self.results.items():
            cols: list[str] = []
            for metrics in rows.values():
                cols += [m for m in metrics if m not in cols]
            lines += ["", f"## {task}", "", "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            for row, metrics in rows.items():
                lines.append(f"| {row} | " + " | ".join(_fmt(metrics.get(c)) for c in cols) + " |")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path, stem: str = "eval_report") -> tuple[Path, Path]:
        """Write <out_dir>/<stem>.json and <stem>.md; returns both paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        js, md = out / f"{stem}.json", out / f"{stem}.md"
        js.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=False))
        md.write_text(self.to_markdown())
        return js, md


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return ""
    if math.isnan(v):
        return "n/a"
    return f"{v:.4g}"


def read_report(path: str | Path) -> EvalReport:
    """Read back a report JSON written by EvalReport.write."""
    raw = json.loads(Path(path).read_text())
    rep = EvalReport(raw["model"], meta=raw.get("meta", {}))
    for task, rows in raw["results"].items():
        rep.add(task, {r: {m: (float("nan") if v is None else v) for m, v in ms.items()} for r, ms in rows.items()})
    return rep


def log_to_mlflow(report: EvalReport, tracking_uri: str, run_id: str, step: int = 0,
                  artifacts: Sequence[str | Path] = ()) -> None:
    """Log a report's metrics (and files) into an existing MLflow run, e.g. the training run being evaluated."""
    from radio_scale.monitoring.tracking import Tracker

    tracker = Tracker(tracking_uri, Path("."), "radio_scale", report.model)
    tracker.start(run_id)
    tracker.log_metrics({k: v for k, v in report.flat().items() if math.isfinite(v)}, step=step)
    for a in artifacts:
        tracker.log_artifact(a, "eval")
    tracker.flush()  # logging is queued (never blocks training): send it before returning


# ------------------------------------------------------------------ periodic evaluation inside training

def eval_resolution(cfg) -> int:
    """Student resolution used for evaluation: the smallest group resolution of the run."""
    return min(g.resolution for s in cfg.stages for g in s.groups)


def run_periodic_eval(student, heads, teachers, cfg, step: int, tracker=None, max_train: int = 1000,
                      max_test: int = 300, fidelity_images: int = 32, forward=None) -> dict[str, float]:
    """Fast evaluation for the trainer every `cfg.eval.every` steps: k-NN of every summary head + teacher fidelity.

    Call it on every rank: the student may be sharded (FSDP is SPMD), so every rank runs the same student
    forwards; fidelity is computed for the teachers each rank holds and gathered. The tracker (enabled on
    rank 0 only) logs `eval/knn/<set>/<head>/top1`, `eval/fidelity/<teacher>/<metric>` at `step`.

    forward: normalised student views -> every head's output, through the sharded root module (the trainer's
    `DistillModel`), so FSDP gathers the root's parameters and casts the input to the compute dtype (bf16);
    None: the student and heads are called directly (an unsharded model).
    """
    import torch
    import torch.distributed as dist

    from radio_scale.eval.datasets import classification_set
    from radio_scale.eval.encoders import _device_of, make_view, student_forward, student_norm, teacher_output
    from radio_scale.eval.fidelity import teacher_fidelity
    from radio_scale.eval.knn import knn_classify

    def heads_of(images, res):
        if forward is None:
            return student_forward(student, heads, images, res)[1]
        return forward(make_view(images, res, *student_norm()).to(_device_of(student)))

    t0 = time.perf_counter()
    teachers = list(teachers.values()) if isinstance(teachers, Mapping) else list(teachers or [])
    was_training = student.training, heads.training
    student.eval()
    heads.eval()
    res = eval_resolution(cfg)
    report = EvalReport(cfg.name)
    try:
        with torch.no_grad():
            for name in cfg.eval.datasets:
                data = classification_set(name)
                xtr, ytr = data.train_images[:max_train], data.train_labels[:max_train]
                xte, yte = data.test_images[:max_test], data.test_labels[:max_test]
                feats = {}
                for split, images in (("train", xtr), ("test", xte)):
                    per_head: dict[str, list] = {}
                    for i in range(0, len(images), 128):
                        head_out = heads_of(images[i:i + 128], res)
                        for t, (summary, _) in head_out.items():
                            if summary is not None:
                                per_head.setdefault(t, []).append(summary.float().cpu())
                    feats[split] = {t: torch.cat(v) for t, v in per_head.items()}
                report.add(f"knn/{name}", {
                    t: knn_classify(feats["train"][t], ytr, feats["test"][t], yte, k=cfg.eval.knn_k,
                                    T=cfg.eval.knn_temperature, num_classes=data.num_classes)
                    for t in feats["test"]})
            # fidelity: one student pass on held-out images, then each local teacher on the same images
            images = classification_set(cfg.eval.datasets[0]).test_images[:fidelity_images]
            head_out = heads_of(images, res)
            fid = {}
            for teacher in teachers:
                if teacher.name not in head_out:
                    continue
                out = teacher_output(teacher, images, aligned=True)
                pred = head_out[teacher.name]
                fid[teacher.name] = teacher_fidelity(pred.summary, pred.spatial, out.summary, out.spatial)
            if dist.is_available() and dist.is_initialized():
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, fid)
                for part in gathered:
                    for k, v in (part or {}).items():
                        fid.setdefault(k, v)
            report.add("fidelity", fid)
    finally:
        student.train(was_training[0])
        heads.train(was_training[1])
    metrics = report.flat()
    metrics["eval/seconds"] = time.perf_counter() - t0
    if tracker is not None:
        tracker.log_metrics(metrics, step=step)
    return metrics


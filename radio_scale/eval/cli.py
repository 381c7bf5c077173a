"""radio-eval: evaluate an exported student, a training checkpoint or a run directory; JSON + markdown report."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

TASKS = ("knn", "zeroshot", "segprobe", "sam", "fidelity", "throughput", "pictures")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="radio-eval",
        description="Evaluate a distilled student: k-NN, zero-shot, linear-probe segmentation, SAM drop-in, "
                    "teacher fidelity, throughput, pictures.")
    p.add_argument("task", choices=(*TASKS, "all"))
    p.add_argument("--model", required=True, help="export dir (model.safetensors + config.yaml), checkpoint dir or run dir")
    p.add_argument("--config", help="the run's config.yaml when it is not next to the model")
    p.add_argument("--data", help="classification set: digits | lfw | folder with train/<class>/ and val/<class>/ "
                                  "(for segprobe/sam: the segmentation set)")
    p.add_argument("--seg-data", default=None, help="segmentation set: digits_on_photos (default) | folder with "
                                                    "images/ + masks/ (or train/ and val/ holding them)")
    p.add_argument("--out", help="report directory (default: <model>/eval)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--resolution", type=int, help="student input side (default: the run's smallest group resolution)")
    p.add_argument("--teacher", action="append", default=[], metavar="NAME",
                   help="also evaluate this teacher (knn/segprobe), or restrict fidelity/pictures to it; repeatable")
    p.add_argument("--head", help="k-NN: the student summary head to use (default: the one --teacher if it has a "
                                  "summary, else the run's first summary teacher)")
    p.add_argument("--source", choices=("head", "backbone"), default="head",
                   help="k-NN: the adaptor head output or the raw student summary token")
    p.add_argument("--k", type=int, help="k-NN neighbours (default: the config's eval.knn_k)")
    p.add_argument("--temperature", type=float, help="k-NN temperature (default: the config's eval.knn_temperature)")
    p.add_argument("--clip", help="zero-shot: the CLIP teacher (default: the run's open_clip teacher)")
    p.add_argument("--templates", choices=("simple", "openai"), default="simple")
    p.add_argument("--sam", help="SAM drop-in: the SAM teacher (default: the run's sam teacher)")
    p.add_argument("--features", action="append", default=None, metavar="NAME",
                   help="segprobe: 'backbone' or a teacher head name; repeatable (default: backbone)")
    p.add_argument("--epochs", type=int, default=20, help="segprobe: probe training epochs")
    p.add_argument("--seg-size", type=int, default=64, help="segprobe/sam: image side of the segmentation set")
    p.add_argument("--max-images", type=int, default=64, help="fidelity: held-out images used")
    p.add_argument("--batch", type=int, default=8, help="throughput: batch size")
    p.add_argument("--iters", type=int, default=5, help="throughput: timed iterations (after 2 warm-up)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="throughput: compute dtype")
    p.add_argument("--peak-tflops", type=float, help="throughput: stated peak for MFU (default: a measured matmul)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI to log the metrics into")
    p.add_argument("--run-id", help="MLflow run id (with --tracking-uri)")
    p.add_argument("--step", type=int, default=0, help="MLflow step of the logged metrics")
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `radio-eval`."""
    args = _parser().parse_args(argv)
    if bool(args.tracking_uri) != bool(args.run_id):
        print("radio-eval: --tracking-uri and --run-id go together", file=sys.stderr)
        return 2
    from radio_scale.eval.loading import ModelLoadError
    from radio_scale.teachers.base import TeacherLoadError

    try:
        report, written = run(args)
    except (ModelLoadError, TeacherLoadError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"radio-eval {args.task}: {e}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else Path(args.model) / "eval"
    json_path, md_path = report.write(out)
    if args.tracking_uri:
        from radio_scale.eval.report import log_to_mlflow

        log_to_mlflow(report, args.tracking_uri, args.run_id, args.step, artifacts=[json_path, md_path, *written])
    print(report.to_markdown())
    print(f"report: {json_path} {md_path}" + "".join(f" {w}" for w in written))
    return 0


def run(args: argparse.Namespace):
    """Load the model and run the requested task(s) -> (EvalReport, extra files written)."""
    import torch

    from radio_scale.eval import suite
    from radio_scale.eval.datasets import classification_set, segmentation_set
    from radio_scale.eval.loading import load_student
    from radio_scale.eval.report import EvalReport, eval_resolution

    torch.manual_seed(0)
    student, heads, cfg = load_student(args.model, args.config, args.device)
    res = args.resolution or eval_resolution(cfg)
    report = EvalReport(str(args.model), meta={"recipe": cfg.name, "resolution": res, "device": args.device,
                                               "task": args.task})
    tasks = TASKS if args.task == "all" else (args.task,)
    families = {t.family for t in cfg.teachers}
    out = Path(args.out) if args.out else Path(args.model) / "eval"
    written: list[Path] = []
    teachers: dict[str, torch.nn.Module] = {}

    def teacher(name: str):
        if name not in teachers:
            teachers[name] = suite.build_eval_teacher(cfg, name, args.device)
        return teachers[name]

    seg_source = args.seg_data or (args.data if args.task in ("segprobe", "sam") else None) or "digits_on_photos"
    cls_source = (args.data if args.task not in ("segprobe", "sam") else None) or cfg.eval.datasets[0]
    loaded: dict = {}

    def cls_data():
        if "cls" not in loaded:  # read once, shared by knn, zero-shot and fidelity
            loaded["cls"] = classification_set(cls_source)
        return loaded["cls"]

    for task in tasks:
        t0 = time.perf_counter()
        if task == "knn":
            head = args.head or suite.default_summary_head(cfg, args.teacher)
            compare = [teacher(n) for n in args.teacher]
            if args.task == "all":  # --teacher also serves tasks where teachers without a summary make sense
                compare = [t for t in compare if t.has_summary]
            report.add(f"knn/{Path(cls_source).name}", suite.knn_task(
                student, heads, cls_data(), res, head, compare,
                k=args.k or cfg.eval.knn_k, T=args.temperature or cfg.eval.knn_temperature, source=args.source))
        elif task == "zeroshot":
            if args.task == "all" and "open_clip" not in families:
                continue
            from radio_scale.eval.zeroshot import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

            templates = OPENAI_IMAGENET_TEMPLATES if args.templates == "openai" else SIMPLE_IMAGENET_TEMPLATES
            clip = teacher(suite.teacher_of_family(cfg, "open_clip", args.clip))
            report.add(f"zeroshot/{Path(cls_source).name}", suite.zeroshot_task(
                student, heads, clip, cls_data(), res, templates))
        elif task == "segprobe":
            from radio_scale.eval.segprobe import ProbeConfig

            train, test = segmentation_set(seg_source, size=args.seg_size)
            feats = [None if f == "backbone" else f for f in (args.features or ["backbone"])]
            report.add(f"segprobe/{Path(seg_source).name}", suite.segprobe_task(
                student, heads, train, test, res, feats, [teacher(n) for n in args.teacher],
                ProbeConfig(epochs=args.epochs)))
        elif task == "sam":
            if args.task == "all" and "sam" not in families:
                continue
            sam = teacher(suite.teacher_of_family(cfg, "sam", args.sam))
            _, test = segmentation_set(seg_source, size=args.seg_size)
            report.add(f"sam/{Path(seg_source).name}", suite.sam_task(student, heads, sam, test, res))
        elif task == "fidelity":
            names = args.teacher or [t.name for t in cfg.teachers]
            images = cls_data().test_images[: args.max_images]
            report.add(f"fidelity/{Path(cls_source).name}", suite.fidelity_task(
                student, heads, [teacher(n) for n in names], images, res))
        elif task == "throughput":
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
            report.add("throughput", suite.throughput_task(
                student, cfg, res, args.batch, args.device, dtype, iters=args.iters,
                peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None))
        elif task == "pictures":
            names = args.teacher or [t.name for t in cfg.teachers]
            image = segmentation_set("digits_on_photos", size=max(res, 64), n=5)[1].images[0]
            run_dir = _run_dir_of(Path(args.model))
            written += suite.pictures_task(student, heads, [teacher(n) for n in names], image, res, out, run_dir)
        report.meta[f"seconds/{task}"] = round(time.perf_counter() - t0, 2)
    return report, written


def _run_dir_of(model: Path) -> Optional[Path]:
    """The run directory a model path belongs to (export/ or checkpoints/step_N inside it), if any."""
    for p in (model, model.parent, model.parent.parent):
        if (p / "metrics.jsonl").is_file():
            return p
    return None


if __name__ == "__main__":
    sys.exit(main())

"""radio-eval: evaluate an exported student, a training checkpoint or a run directory; JSON + markdown report."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

TASKS = ("knn", "zeroshot", "segprobe", "sam", "fidelity", "throughput", "pictures")


PROTOCOLS = """\
protocols (defaults; AM-RADIO's Table 1, RADIO-ViT-H/16 @432, beside them):
  knn       ImageNet-1K k-NN, DINO protocol: summary features (--head; the first summary head), cosine, k=20,
            T=0.07, weighted vote; train split streamed in batches (--batch-size 64) against the held-out bank,
            exact top-k by chunked matmul. Images: short side to S/0.875, centre crop S (--image-size, default
            the student resolution).                                        paper: 86.06 top-1 
  zeroshot  ImageNet-1K zero-shot through the CLIP teacher's text tower: the 80 OpenAI templates
            (--templates openai) x the 1,000 standard class names (--classnames imagenet).
                                                                            paper: 82.93 top-1 
  segprobe  linear probe (BatchNorm + 1x1 conv) on frozen patch features, mIoU with the ignore label (255;
            ADE20K's 0) not scored. ADE20K (150 classes) and VOC 2012 (21 classes) at 512 x 512
            (--seg-size 512), --epochs 20, --seg-batch 16.     paper: ADE20K 51.34, VOC 84.71 mIoU 
  sam       the student's SAM head through SAM's prompt encoder + mask decoder, prompted by every non-crowd
            COCO box; mask IoU to the SAM teacher's own masks (agreement) and to the COCO masks.
                                                                            paper: 76.23 (COCO)    
  many processes: --processes N, or: accelerate launch --num_processes N -m radio_scale.eval.cli <task> ...
  (each sample is read by one process; the metrics are those of one process). Details: docs/evaluation.md
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="radio-eval",
        description="Evaluate a distilled student: k-NN, zero-shot, linear-probe segmentation, SAM drop-in, "
                    "teacher fidelity, throughput, pictures.",
        epilog=PROTOCOLS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=(*TASKS, "all"))
    p.add_argument("--model", required=True, help="export dir (model.safetensors + config.yaml), checkpoint dir or run dir")
    p.add_argument("--config", help="the run's config.yaml when it is not next to the model")
    p.add_argument("--data", help="classification set: digits | lfw | a root with train/ and val/, each class "
                                  "folders (<class>/<image>, ImageNet layout) or webdataset shards (<key>.jpg + "
                                  "<key>.cls); streamed (for segprobe/sam: the segmentation set)")
    p.add_argument("--train-data", help="classification training split (k-NN bank): class folder or shard spec "
                                        "('/data/in1k/train-{000000..001023}.tar', glob, dir of .tar, list .txt)")
    p.add_argument("--val-data", help="classification held-out split: class folder or shard spec")
    p.add_argument("--classnames", help="class names: 'imagenet' (the 1,000 standard names, for zero-shot) or a "
                                        "text file, one a line (default: folder names, the bundled names, or "
                                        "<root>/classnames.txt)")
    p.add_argument("--image-size", type=int, help="knn/zeroshot/fidelity: images are resized (short side to "
                                                  "size/0.875) and centre-cropped to this side (default: the "
                                                  "student resolution; bundled sets: their own 64 px)")
    p.add_argument("--batch-size", type=int, default=64, help="knn/zeroshot: images per batch and process")
    p.add_argument("--workers", type=int, default=0, help="knn/zeroshot: DataLoader decoding workers per process")
    p.add_argument("--processes", type=int, default=1,
                   help="run on N local processes through accelerate's launcher (one per GPU; gloo on CPU); "
                        "the same as `accelerate launch --num_processes N -m radio_scale.eval.cli ...`")
    p.add_argument("--seg-data", default=None, help="segmentation set: digits_on_photos (default) | an ADE20K root "
                                                    "(ADEChallengeData2016) | a Pascal VOC 2012 root (VOCdevkit) | "
                                                    "folder with images/ + masks/ (or train/ and val/ holding them) | "
                                                    "for sam: a COCO instances JSON (instances_val2017.json)")
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
    p.add_argument("--templates", choices=("simple", "openai"), default="openai",
                   help="zero-shot prompts: openai = the 80 ImageNet templates of CLIP (default, the standard "
                        "protocol), simple = open_clip's short list")
    p.add_argument("--sam", help="SAM drop-in: the SAM teacher (default: the run's sam teacher)")
    p.add_argument("--features", action="append", default=None, metavar="NAME",
                   help="segprobe: 'backbone' or a teacher head name; repeatable (default: backbone)")
    p.add_argument("--epochs", type=int, default=20, help="segprobe: probe training epochs")
    p.add_argument("--seg-size", type=int, help="segprobe/sam: image side of the segmentation set (default: 512 "
                                                "for ADE20K / VOC, the paper's probe resolution; 64 for the toy set)")
    p.add_argument("--seg-batch", type=int, default=16, help="segprobe (ADE20K / VOC): images per batch and process")
    p.add_argument("--cache-dir", help="segprobe (ADE20K / VOC): where the training features are cached (fp16; "
                                       "shared by all processes; default: a temporary directory, removed after)")
    p.add_argument("--coco-images", help="sam on COCO: the image folder (default: <json dir>/../<split>, e.g. val2017/)")
    p.add_argument("--sam-images", type=int, help="sam on COCO: evaluate the first N images that hold objects")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.processes < 1:
        print("radio-eval: --processes must be >= 1", file=sys.stderr)
        return 2
    if args.processes > 1 and not _under_launcher():
        return _launch(argv, args.processes)
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
    if report is None:  # not the main process: the main process writes the report
        return 0
    out = Path(args.out) if args.out else Path(args.model) / "eval"
    json_path, md_path = report.write(out)
    if args.tracking_uri:
        from radio_scale.eval.report import log_to_mlflow

        log_to_mlflow(report, args.tracking_uri, args.run_id, args.step, artifacts=[json_path, md_path, *written])
    print(report.to_markdown())
    print(f"report: {json_path} {md_path}" + "".join(f" {w}" for w in written))
    return 0


def _under_launcher() -> bool:
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _launch(argv: list[str], processes: int) -> int:
    """Re-run this command on `processes` local processes with accelerate's launcher (loopback, free port)."""
    import os
    import subprocess

    import torch

    rest, skip = [], False
    for a in argv:  # drop --processes N / --processes=N
        if skip:
            skip = False
            continue
        if a == "--processes":
            skip = True
            continue
        if a.startswith("--processes="):
            continue
        rest.append(a)
    threads = max(1, (os.cpu_count() or 1) // processes)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", "0",
           "--num_cpu_threads_per_process", str(threads), "-m", "radio_scale.eval.cli", *rest]
    env = dict(os.environ)
    if not torch.cuda.is_available() and Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a local run talks over loopback only
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    return _relay_stderr(proc)


def _relay_stderr(proc) -> int:
    """Pass the processes' stderr through as it comes (progress bars included), but drop the launcher's own
    log lines and traceback when a process exits with an error: the processes have already said why."""
    import os
    import re

    launcher_log = re.compile(rb"^[WEI]\d{4} [\d:.]+ +\d+ .*torch/distributed/(elastic|run)")
    pending, held, holding = b"", b"", False
    fd = proc.stderr.fileno()

    def emit(segment: bytes) -> None:
        nonlocal held, holding
        if holding or segment.startswith(b"Traceback (most recent call last)"):
            held, holding = held + segment, True
        elif not launcher_log.match(segment):
            sys.stderr.buffer.write(segment)

    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        pending += chunk
        parts = re.split(rb"(?<=[\r\n])", pending)
        pending = parts.pop()  # an unfinished line waits for its end
        for part in parts:
            emit(part)
        sys.stderr.flush()
    if pending:
        emit(pending)
    code = proc.wait()
    if held:
        blocks = held.split(b"Traceback (most recent call last)")
        if b"ChildFailedError" in blocks[-1]:
            blocks = blocks[:-1]  # the launcher's traceback: drop it, keep a process's own crash before it
        for block in blocks:
            if block.strip():
                sys.stderr.buffer.write(b"Traceback (most recent call last)" + block)
    sys.stderr.flush()
    return 1 if code else 0


def run(args: argparse.Namespace):
    """Load the model and run the requested task(s) -> (EvalReport, extra files written)."""
    import torch

    from radio_scale.eval import suite
    from radio_scale.eval.datasets import segmentation_set
    from radio_scale.eval.loading import load_student
    from radio_scale.eval.report import EvalReport, eval_resolution

    from radio_scale.eval.scale import process_state
    from radio_scale.eval.segdata import seg_kind, seg_splits

    state = process_state(args.device)
    if state.num_processes > 1:
        args.device = str(state.device)
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

    def splits():
        if "splits" not in loaded:  # streamed: opened once, read by knn and zero-shot
            from radio_scale.eval.datasets import BUNDLED_SETS
            from radio_scale.eval.streams import classification_splits

            bundled = not (args.train_data or args.val_data) and cls_source in BUNDLED_SETS
            size = args.image_size or (None if bundled else res)
            loaded["splits"] = classification_splits(None if (args.train_data and not args.data) else cls_source,
                                                     args.train_data, args.val_data, size, args.classnames)
        return loaded["splits"]

    def held_out_images(n: int):
        """The first n held-out images (fidelity), read from the head of the val split."""
        from radio_scale.eval.scale import stream

        _, val, _ = splits()
        got = []
        for b in stream(val, _SingleProcess(), args.batch_size, 0, desc="fidelity"):
            got.append(b.images)
            if sum(len(g) for g in got) >= n:
                break
        if not got:
            raise ValueError(f"fidelity: no readable image in {val.name}")
        return torch.cat(got)[:n]

    stream_kw = dict(state=state, batch_size=args.batch_size, num_workers=args.workers)

    for task in tasks:
        t0 = time.perf_counter()
        if task == "knn":
            head = args.head or suite.default_summary_head(cfg, args.teacher)
            compare = [teacher(n) for n in args.teacher]
            if args.task == "all":  # --teacher also serves tasks where teachers without a summary make sense
                compare = [t for t in compare if t.has_summary]
            train_split, val_split, name = splits()
            report.add(f"knn/{name}", suite.knn_stream_task(
                student, heads, train_split, val_split, res, head, compare,
                k=args.k or cfg.eval.knn_k, T=args.temperature or cfg.eval.knn_temperature, source=args.source,
                **stream_kw))
        elif task == "zeroshot":
            if args.task == "all" and "open_clip" not in families:
                continue
            from radio_scale.eval.zeroshot import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

            templates = OPENAI_IMAGENET_TEMPLATES if args.templates == "openai" else SIMPLE_IMAGENET_TEMPLATES
            clip = teacher(suite.teacher_of_family(cfg, "open_clip", args.clip))
            _, val_split, name = splits()
            report.add(f"zeroshot/{name}", suite.zeroshot_stream_task(
                student, heads, clip, val_split, res, templates, **stream_kw))
        elif task == "segprobe":
            from radio_scale.eval.segprobe import ProbeConfig

            feats = [None if f == "backbone" else f for f in (args.features or ["backbone"])]
            if seg_kind(seg_source):  # ADE20K / VOC: streamed, over all processes
                train, test, name = seg_splits(seg_source, args.seg_size)
                report.add(f"segprobe/{name}", suite.segprobe_stream_task(
                    student, heads, train, test, res, feats, [teacher(n) for n in args.teacher],
                    ProbeConfig(epochs=args.epochs), state, args.cache_dir, args.seg_batch, args.workers))
            else:
                train, test = segmentation_set(seg_source, size=args.seg_size or 64)
                report.add(f"segprobe/{Path(seg_source).name}", suite.segprobe_task(
                    student, heads, train, test, res, feats, [teacher(n) for n in args.teacher],
                    ProbeConfig(epochs=args.epochs)))
        elif task == "sam":
            if args.task == "all" and "sam" not in families:
                continue
            sam = teacher(suite.teacher_of_family(cfg, "sam", args.sam))
            if seg_source.endswith(".json"):  # COCO instances: box prompts of every non-crowd object
                from radio_scale.eval.segdata import CocoInstances

                coco = CocoInstances(seg_source, args.coco_images, max_images=args.sam_images)
                report.add(f"sam/coco_{Path(seg_source).stem.split('_')[-1]}",
                           suite.sam_coco_task(student, heads, sam, coco, res, state))
            elif seg_kind(seg_source):  # ADE20K / VOC: objects = connected regions of each class, first images
                from radio_scale.eval.datasets import SegmentationSet

                _, val, name = seg_splits(seg_source, args.seg_size)
                images, masks = [], []
                for b in val.read(range(min(len(val), args.sam_images or 50)), args.seg_batch):
                    images.append(b.images)
                    masks.append(b.labels)
                if not images or not sum(len(m) for m in masks):
                    raise ValueError(f"SAM drop-in: no readable image in {name}")
                test = SegmentationSet(torch.cat(images), torch.cat(masks), val.classnames)
                report.add(f"sam/{name}", suite.sam_task(student, heads, sam, test, res))
            else:
                _, test = segmentation_set(seg_source, size=args.seg_size or 64)
                report.add(f"sam/{Path(seg_source).name}", suite.sam_task(student, heads, sam, test, res))
        elif task == "fidelity":
            names = args.teacher or [t.name for t in cfg.teachers]
            images = held_out_images(args.max_images)
            report.add(f"fidelity/{splits()[2]}", suite.fidelity_task(
                student, heads, [teacher(n) for n in names], images, res))
        elif task == "throughput":
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
            report.add("throughput", suite.throughput_task(
                student, cfg, res, args.batch, args.device, dtype, iters=args.iters,
                peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None))
        elif task == "pictures":
            if not state.is_main_process:  # files: written once
                continue
            names = args.teacher or [t.name for t in cfg.teachers]
            image = segmentation_set("digits_on_photos", size=max(res, 64), n=5)[1].images[0]
            run_dir = _run_dir_of(Path(args.model))
            written += suite.pictures_task(student, heads, [teacher(n) for n in names], image, res, out, run_dir)
        report.meta[f"seconds/{task}"] = round(time.perf_counter() - t0, 2)
    report.meta["processes"] = state.num_processes
    if not state.is_main_process:
        return None, written
    return report, written


class _SingleProcess:
    """A one-process stand-in for accelerate's state (reading a few images on one process only)."""

    num_processes = 1
    process_index = 0
    is_main_process = False  # no progress bar

    def split_between_processes(self, items):
        from contextlib import nullcontext

        return nullcontext(items)


def _run_dir_of(model: Path) -> Optional[Path]:
    """The run directory a model path belongs to (export/ or checkpoints/step_N inside it), if any."""
    for p in (model, model.parent, model.parent.parent):
        if (p / "metrics.jsonl").is_file():
            return p
    return None


if __name__ == "__main__":
    sys.exit(main())

"""The evaluation tasks on a loaded student (+ heads) and the run's teachers; each returns a report table."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from radio_scale.eval.datasets import ClassificationSet, SegmentationSet, batches
from radio_scale.eval.encoders import (
    student_spatial_encoder,
    student_summary_encoder,
    teacher_spatial_encoder,
    teacher_summary_encoder,
)
from radio_scale.eval.report import Table


def build_eval_teacher(cfg, name: str, device: str = "cpu"):
    """The run's teacher `name`, built from its TeacherConfig (frozen, eval)."""
    from radio_scale.teachers import build_teacher

    try:
        tc = cfg.teacher(name)
    except KeyError:
        raise KeyError(f"teacher '{name}' is not in the run config (teachers: "
                       f"{', '.join(t.name for t in cfg.teachers)})") from None
    return build_teacher(tc, device)


def teacher_of_family(cfg, family: str, name: Optional[str] = None) -> str:
    """The name of the run's teacher of `family` (or check that `name` is one)."""
    names = [t.name for t in cfg.teachers if t.family == family]
    if name is not None:
        if cfg.teacher(name).family != family:
            raise ValueError(f"teacher '{name}' is a {cfg.teacher(name).family} teacher, not {family}")
        return name
    if not names:
        raise ValueError(f"the run has no {family} teacher (teachers: {', '.join(t.name for t in cfg.teachers)})")
    return names[0]


def default_summary_head(cfg, compare: Sequence[str] = ()) -> str:
    """The summary head k-NN uses by default: the one teacher compared against, else the run's first summary teacher."""
    from radio_scale.teachers import teacher_spec

    with_summary = [t.name for t in cfg.teachers if teacher_spec(t).has_summary]
    if not with_summary:
        raise ValueError("the run has no teacher with a summary output, so the student has no summary head")
    if len(compare) == 1 and compare[0] in with_summary:
        return compare[0]
    return with_summary[0]


def knn_task(student, heads, data: ClassificationSet, resolution: int, head: str, teachers: Sequence = (),
             k: int = 20, T: float = 0.07, source: str = "head", batch_size: int = 64) -> Table:
    """k-NN top-1/top-5 of the student's summary (head or backbone token) and of each given teacher's summary."""
    from radio_scale.eval.knn import extract_features, knn_classify

    def run(encoder) -> dict[str, float]:
        ftr, _ = extract_features(encoder, batches(data.train_images, data.train_labels, batch_size))
        fte, _ = extract_features(encoder, batches(data.test_images, data.test_labels, batch_size))
        return knn_classify(ftr, data.train_labels, fte, data.test_labels, k, T, data.num_classes)

    table: Table = {}
    row = f"student/{source}/{head}"
    table[row] = run(student_summary_encoder(student, heads, head, resolution, source))
    for teacher in teachers:
        table[f"teacher/{teacher.name}"] = run(teacher_summary_encoder(teacher))
        if teacher.name == head and table[f"teacher/{teacher.name}"]["top1"] > 0:
            table[row]["top1_vs_teacher"] = table[row]["top1"] / table[f"teacher/{teacher.name}"]["top1"]
    return table


def knn_stream_task(student, heads, train, val, resolution: int, head: str, teachers: Sequence = (), k: int = 20,
                    T: float = 0.07, source: str = "head", state=None, batch_size: int = 64,
                    num_workers: int = 0) -> Table:
    """knn_task on streamed splits (radio_scale.eval.streams), over all processes; one pass for every encoder."""
    from radio_scale.eval.scale import knn_streaming

    row = f"student/{source}/{head}"
    encoders = {row: student_summary_encoder(student, heads, head, resolution, source)}
    for teacher in teachers:
        encoders[f"teacher/{teacher.name}"] = teacher_summary_encoder(teacher)
    table: Table = knn_streaming(encoders, train, val, state, k, T, batch_size=batch_size, num_workers=num_workers)
    for teacher in teachers:
        t = table[f"teacher/{teacher.name}"]
        if teacher.name == head and t["top1"] > 0:
            table[row]["top1_vs_teacher"] = table[row]["top1"] / t["top1"]
    return table


def zeroshot_stream_task(student, heads, clip_teacher, val, resolution: int, templates=None, state=None,
                         batch_size: int = 64, num_workers: int = 0) -> Table:
    """zeroshot_task on a streamed held-out split, over all processes."""
    from radio_scale.eval.scale import zeroshot_streaming
    from radio_scale.eval.zeroshot import build_zeroshot_classifier

    if not val.classnames:
        raise ValueError(f"zero-shot: the split {val.name} has no class names (pass --classnames imagenet or a file)")
    classifier = build_zeroshot_classifier(clip_teacher, val.classnames, templates)
    encoders = {f"student/{clip_teacher.name}": student_summary_encoder(student, heads, clip_teacher.name, resolution),
                f"teacher/{clip_teacher.name}": clip_image_encoder(clip_teacher)}
    return zeroshot_streaming(encoders, {n: classifier for n in encoders}, val, state, batch_size, num_workers)


def zeroshot_task(student, heads, clip_teacher, data: ClassificationSet, resolution: int,
                  templates=None, batch_size: int = 64) -> Table:
    """Zero-shot top-1/top-5 through the student's CLIP summary head and through the CLIP teacher itself."""
    from radio_scale.eval.zeroshot import build_zeroshot_classifier, evaluate_zeroshot

    classifier = build_zeroshot_classifier(clip_teacher, data.classnames, templates)
    loader = lambda: batches(data.test_images, data.test_labels, batch_size)  # noqa: E731
    return {
        f"student/{clip_teacher.name}": evaluate_zeroshot(
            student_summary_encoder(student, heads, clip_teacher.name, resolution), clip_teacher, loader(),
            data.classnames, classifier=classifier),
        f"teacher/{clip_teacher.name}": evaluate_zeroshot(
            clip_image_encoder(clip_teacher), clip_teacher, loader(), data.classnames, classifier=classifier),
    }


def clip_image_encoder(teacher):
    """The CLIP teacher's own image embedding: its encode_image when it has one, else its summary."""
    if hasattr(teacher, "encode_image"):
        from radio_scale.eval.encoders import teacher_view

        @torch.no_grad()
        def encode(images: torch.Tensor) -> torch.Tensor:
            return teacher.encode_image(teacher_view(images, teacher).to(next(teacher.parameters()).device))

        return encode
    return teacher_summary_encoder(teacher)


def segprobe_task(student, heads, train: SegmentationSet, test: SegmentationSet, resolution: int,
                  features: Sequence[Optional[str]] = (None,), teachers: Sequence = (), probe_cfg=None) -> Table:
    """Linear-probe mIoU on the student's backbone patches (None) and/or head outputs, and on teachers' own maps."""
    from radio_scale.eval.segprobe import ProbeConfig, evaluate_segprobe

    cfg = probe_cfg or ProbeConfig()
    table: Table = {}
    for f in features:
        enc = student_spatial_encoder(student, heads, f, resolution)
        table[f"student/{f or 'backbone'}"] = evaluate_segprobe(
            enc, train.images, train.masks, test.images, test.masks, train.num_classes, cfg)
    for t in teachers:
        table[f"teacher/{t.name}"] = evaluate_segprobe(
            teacher_spatial_encoder(t), train.images, train.masks, test.images, test.masks, train.num_classes, cfg)
    return table


def sam_task(student, heads, sam_teacher, data: SegmentationSet, resolution: int) -> Table:
    """Box-prompted SAM masks from the student's SAM head vs the SAM teacher's own, and vs ground truth."""
    from radio_scale.eval.datasets import instances_from_semantic
    from radio_scale.eval.sam_dropin import evaluate_sam_dropin

    enc = student_spatial_encoder(student, heads, sam_teacher.name, resolution, resize_mode="longest_pad")
    # folders hold class ids only: their objects are the connected regions of each non-background class
    instances = data.instances or [instances_from_semantic(m) for m in data.masks]
    keep = [i for i, inst in enumerate(instances) if len(inst)]
    if not keep:
        raise ValueError("SAM drop-in: the segmentation set holds no object (no non-background region)")
    metrics = evaluate_sam_dropin(enc, sam_teacher, [data.images[i] for i in keep],
                                  gt_masks=[instances[i] for i in keep])
    return {f"student/{sam_teacher.name}": metrics}


@torch.no_grad()
def fidelity_task(student, heads, teachers: Sequence, images: torch.Tensor, resolution: int, batch_size: int = 32) -> Table:
    """Per teacher: summary/spatial cosine and MSE between the student's head and the teacher on `images`."""
    from radio_scale.eval.encoders import student_forward, teacher_output
    from radio_scale.eval.fidelity import mean_of, teacher_fidelity

    records: dict[str, list] = {t.name: [] for t in teachers}
    sizes: list[int] = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        _, head_out = student_forward(student, heads, x, resolution)
        sizes.append(len(x))
        for t in teachers:
            out = teacher_output(t, x, aligned=True)
            pred = head_out[t.name]
            records[t.name].append(teacher_fidelity(pred.summary, pred.spatial, out.summary, out.spatial))
    return {name: mean_of(recs, sizes) for name, recs in records.items()}


def throughput_task(student, cfg, resolution: int, batch_size: int, device: str = "cpu", dtype=torch.float32,
                    iters: int = 5, warmup: int = 2, peak_flops: Optional[float] = None,
                    measure_peak: bool = True) -> Table:
    """Student images/s at (resolution, batch), analytic and counted FLOPs, and MFU against a peak."""
    from radio_scale.eval.throughput import flop_crosscheck, measure_matmul_peak, measure_throughput

    flops = flop_crosscheck(student, cfg.student, resolution, len(student.summary_teachers))
    if peak_flops is None and measure_peak:
        peak_flops = measure_matmul_peak(dtype, device)
    student = student.to(device)
    res = measure_throughput(lambda x: student(x), resolution, batch_size, warmup, iters, device, dtype,
                             flops_per_image=int(flops["analytic_gflops"] * 1e9), peak_flops=peak_flops)
    return {f"student@{resolution}": {**res.as_dict(), **flops}}


def pictures_task(student, heads, teachers: Sequence, image: torch.Tensor, resolution: int, out_dir: str | Path,
                  run_dir: Optional[str | Path] = None, tracker=None) -> list[Path]:
    """PCA maps (student head vs teacher, per teacher) of one image, and the loss curves when the run has metrics.

    With a tracker (radio_scale.monitoring.tracking.Tracker, started) the PNGs are logged as MLflow artifacts.
    """
    from radio_scale.eval.encoders import student_forward, teacher_output
    from radio_scale.eval.pictures import log_pictures, plot_loss_curves, plot_pca_maps

    out_dir = Path(out_dir)
    written = []
    with torch.no_grad():
        _, head_out = student_forward(student, heads, image[None], resolution)
        pairs = {}
        for t in teachers:
            pairs[t.name] = (head_out[t.name].spatial[0], teacher_output(t, image[None]).spatial[0])
    if pairs:
        written.append(plot_pca_maps(image, pairs, out_dir / "pca_maps.png"))
    if run_dir is not None and (Path(run_dir) / "metrics.jsonl").is_file():
        written.append(plot_loss_curves(run_dir, out_dir / "loss_curves.png"))
    log_pictures(written, tracker)
    return written


def segprobe_stream_task(student, heads, train, val, resolution: int, features: Sequence[Optional[str]] = (None,),
                         teachers: Sequence = (), probe_cfg=None, state=None, cache_dir=None, batch_size: int = 16,
                         num_workers: int = 0) -> Table:
    """segprobe_task on streamed ADE20K / VOC splits (radio_scale.eval.segdata), over all processes."""
    from radio_scale.eval.scale import segprobe_streaming

    encoders = {f"student/{f or 'backbone'}": student_spatial_encoder(student, heads, f, resolution) for f in features}
    for t in teachers:
        encoders[f"teacher/{t.name}"] = teacher_spatial_encoder(t)
    return segprobe_streaming(encoders, train, val, train.num_classes, state, probe_cfg, cache_dir, batch_size,
                              num_workers)


def sam_coco_task(student, heads, sam_teacher, coco, resolution: int, state=None) -> Table:
    """SAM drop-in on COCO instances: each object's box prompts SAM's decoder on the student's embedding and on the
    teacher's; mask IoU student vs teacher (agreement) and both vs the COCO mask. Images split over processes."""
    from collections import Counter

    from tqdm.auto import tqdm

    from radio_scale.eval.sam_dropin import evaluate_sam_dropin
    from radio_scale.eval.scale import process_state, sum_counters, sum_tensor

    state = state or process_state()
    enc = student_spatial_encoder(student, heads, sam_teacher.name, resolution, resize_mode="longest_pad")
    with state.split_between_processes(list(range(len(coco)))) as mine:
        mine = list(mine)
    sums = torch.zeros(5, dtype=torch.float64)  # agreement, logit_se, student_gt, teacher_gt, masks
    skipped: Counter = Counter()
    for i in tqdm(mine, desc="SAM drop-in", disable=not state.is_main_process, mininterval=2.0, leave=False):
        item = coco.load(i, skipped)
        if item is None:
            continue
        m = evaluate_sam_dropin(enc, sam_teacher, [item.image], gt_masks=[item.masks], boxes=[item.boxes])
        n = m["num_masks"]
        sums += torch.tensor([m["agreement_iou"] * n, m["logit_mse"] * n, m["student_gt_iou"] * n,
                              m["teacher_gt_iou"] * n, n], dtype=torch.float64)
    sums = sum_tensor(state, sums)
    skipped = sum_counters(state, skipped)
    skipped.update(coco.skipped)
    n = float(sums[4])
    if n == 0:
        raise ValueError(f"SAM drop-in: no COCO object could be evaluated (skipped: {dict(skipped) or 'none'})")
    return {f"student/{sam_teacher.name}": {
        "agreement_iou": float(sums[0] / n), "logit_mse": float(sums[1] / n), "student_gt_iou": float(sums[2] / n),
        "teacher_gt_iou": float(sums[3] / n), "num_masks": n, "skipped": float(sum(skipped.values()))}}

"""Data throughput: images/s one loader worker (one core) delivers, against the images/s one rank consumes.

(a) the smoke recipe's views (student 64 / 96 / 128 + tiny teachers: clip 64, dino 56, effnet 128, SAM 128
    longest_pad), against a measured smoke training step on this CPU (tiny teachers + student + heads +
    losses + AdamW; or --consumer-ips);
(b) two_stage stage 2 (student 432 + DFN CLIP 378 + OpenAI CLIP 336 + DINOv2 224; student 1024 + SAM 1024
    longest_pad), against the planner's analytic per-rank step time for 64 GPUs (radio_scale.distributed).

Images: the bundled training shards (photos 96-512 px on the long side) unless --shards is given.
Writes the table into docs/benchmarks.md under "## Data throughput" (only that section) unless --no-write.

    python benchmarks/data_throughput.py [--shards SPEC] [--consumer-ips N] [--no-write]
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import time
from pathlib import Path

import torch

from radio_scale.data import STUDENT_MEAN, STUDENT_STD, ViewSpec, build_loader

SECTION = "## Data throughput"
DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

SMOKE_TEACHERS = [ViewSpec("clip", 64, STUDENT_MEAN, STUDENT_STD), ViewSpec("dino", 56, *IMAGENET),
                  ViewSpec("effnet", 128, *HALF)]
CASES = [
    # (label, recipe group, student px, views, batch per rank)
    ("smoke stage1 clip_dino", "smoke", 64, SMOKE_TEACHERS, 4),
    ("smoke stage2 clip_dino", "smoke", 96, SMOKE_TEACHERS, 4),
    ("smoke stage2 sam", "smoke", 128, [ViewSpec("sam", 128, *IMAGENET, "longest_pad")], 1),
    ("two_stage s2 clip_dino", "clip_dino", 432, [ViewSpec("dfn_clip", 378, STUDENT_MEAN, STUDENT_STD),
                                                  ViewSpec("openai_clip", 336, STUDENT_MEAN, STUDENT_STD),
                                                  ViewSpec("dinov2", 224, *IMAGENET)], 32),
    ("two_stage s2 sam", "sam", 1024, [ViewSpec("sam", 1024, *IMAGENET, "longest_pad")], 2),
]


def worker_ips(shards: str, student: int, views: list[ViewSpec], batch: int, images: int) -> tuple[float, float]:
    """(per core-second, per wall-second) images/s of one loader stream in this process (= one DataLoader worker)."""
    torch.set_num_threads(1)  # what a DataLoader worker gets
    loader = build_loader(shards, student, views, batch, seed=0, num_workers=0, shuffle_buffer=64)
    next(loader)  # fills the shuffle buffer: a one-off per chunk, not per image
    n, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
    while n < images:
        n += len(next(loader))
    return n / (time.process_time() - cpu0), n / (time.perf_counter() - wall0)


def smoke_step_ips(steps: int = 6) -> float:
    """Images/s one rank consumes in a smoke stage-1 step on one core (tiny teachers, student, heads, AdamW)."""
    from radio_scale.config import load_config
    from radio_scale.losses import spatial_loss, summary_loss
    from radio_scale.teachers import build_teacher
    from radio_scale.train.trainer import build_model

    # The smoke run puts two ranks on this 2-core machine: one rank has one core.
    torch.set_num_threads(1)
    cfg = load_config("smoke")
    group = cfg.stages[0].groups[0]
    model, _ = build_model(cfg)
    teachers = {n: build_teacher(cfg.teacher(n)) for n in group.teachers}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    views = [ViewSpec(t.name, t.input_size, tuple(t.mean), tuple(t.std), t.resize_mode) for t in teachers.values()]
    loader = build_loader("bundled", group.resolution, views, group.batch_per_rank, seed=0, num_workers=0,
                          shuffle_buffer=64)
    batches = [next(loader) for _ in range(steps + 1)]  # data time excluded: this is the consumer alone

    def step(batch) -> None:
        batch = batch.normalized()  # uint8 views -> float32, as the trainer does on its device
        with torch.no_grad():
            targets = {n: t(batch.teachers[n]) for n, t in teachers.items()}
        preds = model(batch.student, window_size=0)
        loss = 0.0
        for n, tgt in targets.items():
            pred = preds[n]
            if pred.summary is not None and tgt.summary is not None:
                loss = loss + summary_loss(pred.summary, tgt.summary).mean()
            loss = loss + spatial_loss(pred.spatial, tgt.spatial).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(batches[0])  # warm-up
    t0 = time.process_time()  # one thread: core time, robust to other load on a shared machine
    for b in batches[1:]:
        step(b)
    return steps * group.batch_per_rank / (time.process_time() - t0)


def planned_rank_ips(world: int = 64) -> dict[str, float]:
    """Images/s one rank of each two_stage stage-2 group consumes, from the planner's analytic step time."""
    from radio_scale.config import load_config
    from radio_scale.distributed.plan import make_plan

    plan = make_plan(load_config("two_stage"), world, 1)
    return {g.name: g.batch_per_rank / g.step_time_s for g in plan.groups}


def machine() -> str:
    """This machine in a few words (core count, CPU model, torch version)."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({model or platform.processor()}), torch {torch.__version__}"


def write_section(text: str) -> None:
    """Replace (or append) this benchmark's section of docs/benchmarks.md, leaving the others alone."""
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = f"{SECTION}\n\n{text.strip()}\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    doc = pattern.sub(lambda _: block + "\n", doc) if pattern.search(doc) else doc.rstrip() + "\n\n" + block
    DOC.write_text(doc)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="bundled")
    ap.add_argument("--images", type=int, default=256, help="images timed per smoke case (a quarter for two_stage)")
    ap.add_argument("--consumer-ips", type=float, default=None, help="smoke consumer images/s (skip the measurement)")
    ap.add_argument("--world", type=int, default=64, help="world size of the planned two_stage run")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    consumer_note = "given (--consumer-ips)"
    smoke_consumer = args.consumer_ips
    if smoke_consumer is None:
        smoke_consumer = smoke_step_ips()
        consumer_note = ("measured: smoke stage-1 step (tiny teachers + student + heads + losses + AdamW), "
                         "fp32, one core (the smoke run puts 2 ranks on 2 cores)")
    planned = planned_rank_ips(args.world)
    rows = []
    for label, group, student, views, batch in CASES:
        n = args.images if group == "smoke" else max(args.images // 4, 2 * batch)
        ips, wall_ips = worker_ips(args.shards, student, views, batch, n)
        need = smoke_consumer if group == "smoke" else planned[group]
        views_txt = f"student {student} + " + " + ".join(
            f"{v.name} {v.size}{' pad' if v.resize_mode == 'longest_pad' else ''}" for v in views)
        rows.append((label, views_txt, batch, ips, wall_ips, need, ips / need))
        print(f"{label:24s} {views_txt:66s} worker {ips:7.1f} img/s per core ({wall_ips:6.1f} wall) | "
              f"rank consumes {need:6.1f} img/s | headroom per worker {ips / need:6.2f}x", flush=True)

    lines = [
        f"`python benchmarks/data_throughput.py` on {machine()}; images: the bundled training shards "
        f"(jpg, 96-512 px long side). One loader stream in one process with one torch thread = one DataLoader "
        f"worker on one core: decode once, one random crop, every view resized and normalised, batched. "
        f"Rates are per core-second (process CPU time; the machine was shared, wall-clock rates in brackets).",
        "",
        f"Consumer: smoke rows {consumer_note}; two_stage rows: one rank of a {args.world}-GPU run, from the "
        f"planner's analytic step time (radio_scale.distributed.plan; 989 TFLOPS x 0.4 MFU per GPU).",
        "",
        "| case | views | batch/rank | worker img/s per core (wall) | rank consumes img/s | headroom per worker | workers for 3x |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, views_txt, batch, ips, wall_ips, need, ratio in rows:
        workers = max(1, -(-3 * need // ips))
        lines.append(f"| {label} | {views_txt} | {batch} | {ips:.0f} ({wall_ips:.0f}) | {need:.1f} | {ratio:.1f}x "
                     f"| {workers:.0f} |")
    text = "\n".join(lines)
    print()
    print(text)
    if not args.no_write:
        write_section(text)
        print(f"\nwrote {DOC} ({SECTION})")


if __name__ == "__main__":
    main()

"""Reading every sample of a shard set once: counts, image sizes, labels and bad samples by reason."""
from __future__ import annotations

from typing import Optional

from tqdm import tqdm

from radio_scale.data.shards import resolve_shards
from radio_scale.data.stream import Counters, read_shard
from radio_scale.data.views import SampleSkip, probe_image

SIZE_BINS = ((64, "<64"), (128, "64-127"), (256, "128-255"), (512, "256-511"), (1024, "512-1023"),
             (2048, "1024-2047"), (None, ">=2048"))


def _size_bin(longest: int) -> str:
    for limit, name in SIZE_BINS:
        if limit is None or longest < limit:
            return name
    raise AssertionError("unreachable")


def inspect_shards(spec: str, *, image_key: str = "jpg;jpeg;png;webp", label_key: Optional[str] = "cls",
                   progress: Optional[bool] = None, allow_pipe_in_lists: bool = False) -> dict:
    """A report (plain data) on every shard of `spec`: samples, usable images, size histogram, labels, skips."""
    shards = resolve_shards(spec, allow_pipe_in_lists)
    keys = [k.strip().lower() for k in image_key.split(";") if k.strip()]
    counters = Counters()
    per_shard: dict[str, dict[str, int]] = {}
    sizes = {name: 0 for _, name in SIZE_BINS}
    labels: dict[int, int] = {}
    for url in tqdm(shards, desc="inspect", unit="shard", disable=True if progress is False else None):
        mine = per_shard.setdefault(url, {"samples": 0, "used": 0})
        for sample in read_shard(url, counters):
            counters.seen += 1
            mine["samples"] += 1
            try:
                data = next((sample[k] for k in keys if k in sample), None)
                if data is None:
                    raise SampleSkip("missing_image")
                label = None
                if label_key and label_key in sample:
                    try:
                        label = int(sample[label_key].decode().strip())
                    except (ValueError, UnicodeDecodeError):
                        raise SampleSkip("bad_label") from None
                w, h = probe_image(data)
            except SampleSkip as skip:
                counters.skip(skip.args[0], url)
                continue
            counters.used += 1
            mine["used"] += 1
            sizes[_size_bin(max(w, h))] += 1
            if label is not None:
                labels[label] = labels.get(label, 0) + 1
    report = counters.as_dict()
    report.update(shards=per_shard, sizes=sizes, labels=dict(sorted(labels.items())))
    return report


def format_report(report: dict) -> str:
    """The report as text for a terminal."""
    lines = [f"shards: {len(report['shards'])}   samples: {report['seen']}   usable: {report['used']}   "
             f"skipped: {sum(report['skipped'].values())}   shard errors: {sum(report['shard_errors'].values())}"]
    lines.append("image size (longest side):")
    for name, n in report["sizes"].items():
        if n:
            lines.append(f"  {name:>10}  {n}")
    if report["labels"]:
        lines.append("labels: " + ", ".join(f"{k}: {v}" for k, v in report["labels"].items()))
    if report["skipped"] or report["shard_errors"]:
        lines.append("bad samples / errors by reason:")
        for k, v in {**report["skipped"], **report["shard_errors"]}.items():
            lines.append(f"  {k:>16}  {v}")
        lines.append("by shard:")
        for url, per in report["by_shard"].items():
            lines.append(f"  {url}: " + ", ".join(f"{k} {v}" for k, v in per.items()))
    lines.append("per shard (samples / usable):")
    for url, per in report["shards"].items():
        lines.append(f"  {url}: {per['samples']} / {per['used']}")
    return "\n".join(lines)

"""Writing shards: an image folder (labels from sub-folder names) or existing tars → webdataset shards + manifest."""
from __future__ import annotations

import io
import json
import os
import random
import re
from pathlib import Path
from typing import Optional

from PIL import Image
from tqdm import tqdm

from radio_scale.data.shards import DataError, resolve_shards
from radio_scale.data.stream import Counters, read_shard

# Stored as they are (the loader's default image keys read them).
_KEEP = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
# Re-encoded to png on the way in.
_CONVERT = {".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}


def safe_key(key: str) -> str:
    """A sample key that is a harmless relative member name: no absolute path, no '..' or '.' or empty parts,
    no backslashes, drive letters or control characters (sub-folders that stay inside the shard are kept)."""
    parts = [re.sub(r"[\x00-\x1f\x7f]", "_", p) for p in str(key).replace("\\", "/").split("/")]
    parts = [p for p in parts if p not in ("", ".", "..")]
    if parts and re.fullmatch(r"[A-Za-z]:", parts[0]):
        parts = parts[1:]
    return "/".join(parts) or "sample"


class _UniqueKeys:
    """Sanitised keys (`safe_key`), unique over everything written: a repeat gets a _1, _2, ... suffix."""

    def __init__(self) -> None:
        self.used: set[str] = set()
        self.renamed = 0

    def __call__(self, key: str) -> str:
        safe = base = safe_key(key)
        n = 0
        while safe in self.used:
            n += 1
            safe = f"{base}_{n}"
        self.used.add(safe)
        self.renamed += safe != key
        return safe


def _check_out(out: Path) -> None:
    if out.exists() and (any(out.glob("*.tar")) or (out / "manifest.json").exists()):
        raise DataError(f"make-shards: {out} already holds shards; choose an empty directory")
    out.mkdir(parents=True, exist_ok=True)


def _folder_samples(src: Path, seed: Optional[int], skipped: Counters):
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in (_KEEP.keys() | _CONVERT))
    if not files:
        raise DataError(f"make-shards: no images under {src}")
    rels = [p.relative_to(src) for p in files]
    labelled = all(len(r.parts) >= 2 for r in rels)
    names = sorted({r.parts[0] for r in rels}) if labelled else None
    index = {n: i for i, n in enumerate(names or [])}
    order = list(range(len(files)))
    if seed is not None:  # class folders would otherwise land in separate shards
        random.Random(seed).shuffle(order)

    def gen():
        for n, i in enumerate(order):
            path, rel = files[i], rels[i]
            data = path.read_bytes()
            if not data:
                skipped.skip("empty_image", str(path))
                continue
            ext = _KEEP.get(path.suffix.lower())
            if ext is None:
                try:
                    buf = io.BytesIO()
                    Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="PNG")
                except Exception:
                    skipped.skip("undecodable", str(path))
                    continue
                data, ext = buf.getvalue(), "png"
            sample = {"__key__": f"{n:09d}", ext: data, "json": json.dumps({"path": str(rel)}).encode()}
            if names is not None:
                sample["cls"] = str(index[rel.parts[0]]).encode()
            yield sample

    return gen(), len(files), names


def _tar_samples(spec: str, counters: Counters, allow_pipe_in_lists: bool = False):
    shards = resolve_shards(spec, allow_pipe_in_lists)
    names = None
    manifest = Path(shards[0]).parent / "manifest.json"
    if manifest.is_file():  # carry label names over from a manifest written by make-shards
        names = json.loads(manifest.read_text()).get("labels")

    def gen():
        for url in shards:
            for sample in read_shard(url, counters):
                yield {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}

    return gen(), None, names


def make_shards(src: str, out: str, *, samples_per_shard: int = 1000, max_shard_bytes: int = 1_000_000_000,
                seed: Optional[int] = 0, progress: Optional[bool] = None, allow_pipe_in_lists: bool = False) -> dict:
    """Write SRC (an image folder, or shards to re-shard) as shards under OUT plus manifest.json; return the manifest.

    Sample keys are written sanitised and unique (`safe_key`): a source tar's `../../x` or `/abs/x` member
    becomes `x` (or `x_1` if taken), never a path that escapes the directory it is extracted into.
    """
    import webdataset as wds

    if samples_per_shard < 1 or max_shard_bytes < 1:
        raise DataError("make-shards: --samples-per-shard and --max-shard-bytes must be positive")
    out_dir = Path(out)
    counters = Counters()
    src_path = Path(src)
    if src_path.is_dir() and not any(src_path.glob("*.tar")):
        samples, total, names = _folder_samples(src_path, seed, counters)
    else:
        samples, total, names = _tar_samples(src, counters, allow_pipe_in_lists)
    _check_out(out_dir)
    counts: dict[str, int] = {}
    writer = None

    def finished(fname: str) -> None:
        counts[os.path.basename(fname)] = writer.count

    written = 0
    unique = _UniqueKeys()
    writer = wds.ShardWriter(str(out_dir / "shard-%06d.tar"), maxcount=samples_per_shard,
                             maxsize=max_shard_bytes, post=finished, verbose=0)
    with writer:
        for sample in tqdm(samples, total=total, desc="make-shards", unit="img", disable=True if progress is False else None):
            writer.write({**sample, "__key__": unique(sample["__key__"])})
            written += 1
    if written == 0:
        for p in out_dir.glob("shard-*.tar"):
            p.unlink()
        raise DataError(f"make-shards: no usable samples in {src}")
    manifest = {
        "version": 1,
        "source": str(src),
        "shards": sorted(counts),
        "counts": {k: counts[k] for k in sorted(counts)},
        "bytes": {k: (out_dir / k).stat().st_size for k in sorted(counts)},
        "total": written,
        "labels": names,
        "skipped": counters.skipped,
        "shard_errors": counters.shard_errors,
        "renamed_keys": unique.renamed,  # source keys that were unsafe or repeated, written under a new name
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest

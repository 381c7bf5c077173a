"""Shard specs: turn "bundled", brace patterns, globs, list files and URLs into a list of shards."""
from __future__ import annotations

import glob
import os
import re
import zlib
from pathlib import Path

import braceexpand


class DataError(ValueError):
    """Bad data configuration or input (one line naming the key, path or shard)."""


_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "ais://", "sftp://", "scp://", "ftps://")
_GLOB_CHARS = set("*?[")


def is_remote(url: str) -> bool:
    """True for shards that are opened by a command or a network client rather than from disk."""
    return url.startswith(_REMOTE_PREFIXES)


def resolve_shards(spec: str, allow_pipe_in_lists: bool = False) -> list[str]:
    """Expand a shard spec into the shard list; raise DataError when it names nothing that exists.

    Accepted: "bundled" / "bundled:<set>" (the offline dataset, created on first use), a local path,
    a directory (its *.tar), brace patterns (/d/{000..009}.tar), globs, a .txt list file (one spec a
    line, relative to the file), pipe: commands and URLs (passed through), several specs joined by "::".
    A `pipe:` command runs through a shell: it is taken from `spec` itself (what the user wrote), but a
    `pipe:` line inside a list file is refused (DataError naming the file and line) unless
    allow_pipe_in_lists (data.allow_pipe_in_lists).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"data.shards: empty shard spec {spec!r}")
    out: list[str] = []
    for part in spec.split("::"):
        out.extend(_resolve_one(part.strip(), base=None, allow_pipe=allow_pipe_in_lists))
    if not out:
        raise DataError(f"data.shards: {spec!r} names no shards")
    return out


def _resolve_one(spec: str, base: Path | None, allow_pipe: bool = False) -> list[str]:
    if spec == "bundled" or spec.startswith("bundled:"):
        from radio_scale.data.bundled import bundled_shards

        name = spec.partition(":")[2] or "train"
        return bundled_shards(name)
    if is_remote(spec):
        return list(braceexpand.braceexpand(spec))
    spec = re.sub(r"^file://?", "", spec)
    if base is not None and not os.path.isabs(os.path.expanduser(spec)):
        spec = str(base / spec)
    spec = os.path.expanduser(spec)
    if spec.endswith(".txt"):
        return _read_list_file(Path(spec), allow_pipe)
    expanded = list(braceexpand.braceexpand(spec))
    out: list[str] = []
    for pattern in expanded:
        if _GLOB_CHARS & set(pattern):
            hits = sorted(glob.glob(pattern))
            if not hits:
                raise DataError(f"data.shards: no files match {pattern}")
            out.extend(hits)
        elif os.path.isdir(pattern):
            hits = sorted(str(p) for p in Path(pattern).glob("*.tar"))
            if not hits:
                raise DataError(f"data.shards: directory {pattern} holds no .tar shards")
            out.extend(hits)
        elif os.path.exists(pattern):
            out.append(pattern)
        else:
            missing = [p for p in expanded if not os.path.exists(p)]
            more = f" (and {len(missing) - 1} more of {len(expanded)})" if len(missing) > 1 else ""
            raise DataError(f"data.shards: shard not found: {pattern}{more}")
    return out


def _read_list_file(path: Path, allow_pipe: bool = False) -> list[str]:
    if not path.is_file():
        raise DataError(f"data.shards: list file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise DataError(f"data.shards: cannot read list file {path} ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise DataError(f"data.shards: list file {path} is not UTF-8 text") from None
    out: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("pipe:") and not allow_pipe:
            # a list file is data, not a command line: its pipe: lines would run through a shell
            raise DataError(f"data.shards: list file {path} line {number} is a 'pipe:' command, refused in list files "
                            "(write it in data.shards itself, or set data.allow_pipe_in_lists=true)")
        out.extend(_resolve_one(line, base=path.parent, allow_pipe=allow_pipe))
    if not out:
        raise DataError(f"data.shards: list file {path} names no shards")
    return out


def shards_fingerprint(shards: list[str]) -> str:
    """A short identity of a shard list that survives moving the data directory (basenames only)."""
    names = "\n".join(os.path.basename(s.rstrip("/")) for s in shards)
    return f"{len(shards)}:{zlib.crc32(names.encode()):08x}"

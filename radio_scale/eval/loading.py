"""Load a student to evaluate: an export directory, a DCP training checkpoint, or a run directory."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import yaml

from radio_scale.config import RunConfig, config_from_dict


class ModelLoadError(RuntimeError):
    """The path given as a model is not an export, a checkpoint or a run directory (one line)."""


def _read_config(path: Path) -> RunConfig:
    if not path.is_file():
        raise ModelLoadError(f"no run config at {path} (pass --config with the run's config.yaml)")
    return config_from_dict(yaml.safe_load(path.read_text()), src=str(path))


def _checkpoint_config(ckpt: Path) -> Path:
    """The run's config.yaml for <run_dir>/checkpoints/step_N (the trainer writes it in the run directory)."""
    for parent in (ckpt, ckpt.parent, ckpt.parent.parent):
        if (parent / "config.yaml").is_file():
            return parent / "config.yaml"
    return ckpt.parent.parent / "config.yaml"


def build_from_state(cfg: RunConfig, state: dict[str, torch.Tensor], where: str, device: str = "cpu"):
    """(student, heads) built from the run config and loaded from a `student.*` / `heads.*` state dict."""
    from radio_scale.models import AdaptorHeads
    from radio_scale.teachers.spec import teacher_spec

    specs = [teacher_spec(t) for t in cfg.teachers]
    from radio_scale.models.registry import build_any_student  # ViT presets, E-RADIO, timm:<name>

    student = build_any_student(cfg.student, [s.name for s in specs if s.has_summary])
    heads = AdaptorHeads(student.embed_dim, specs)
    for prefix, module in (("student.", student), ("heads.", heads)):
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not sub:
            raise ModelLoadError(f"{where}: no '{prefix}*' tensors (is it a radio_scale student?)")
        missing, unexpected = module.load_state_dict(sub, strict=False)
        if missing or unexpected:
            raise ModelLoadError(f"{where}: '{prefix}' weights do not fit the config's model "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return student.to(device).eval(), heads.to(device).eval()


def load_student(path: str | Path, config: Optional[str | Path] = None, device: str = "cpu"):
    """Model path -> (student, heads, cfg) in eval mode.

    path: an export directory (model.safetensors + config.yaml), a checkpoint directory (DCP, read
    without a process group), or a run directory (its export if finished, else its newest complete
    checkpoint). config: the run's config.yaml when it is not where the trainer writes it.
    """
    from radio_scale.train.checkpoint import COMPLETE, latest_complete, load_model_weights

    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        cfg = _read_config(Path(config) if config else path / "config.yaml")
        state = load_file(str(path / "model.safetensors"), device="cpu")
        return (*build_from_state(cfg, state, str(path), device), cfg)
    if (path / ".metadata").is_file():
        if not (path / COMPLETE).is_file():
            raise ModelLoadError(f"checkpoint {path} is incomplete (no {COMPLETE} marker): pick a complete one")
        cfg = _read_config(Path(config) if config else _checkpoint_config(path))
        state = load_model_weights(path)
        return (*build_from_state(cfg, state, str(path), device), cfg)
    if (path / "export" / "model.safetensors").is_file():
        return load_student(path / "export", config, device)
    ckpt = latest_complete(path / "checkpoints") or latest_complete(path)
    if ckpt is not None:
        return load_student(ckpt, config or (path / "config.yaml" if (path / "config.yaml").is_file() else None), device)
    raise ModelLoadError(f"{path}: not an export (model.safetensors), a checkpoint (.metadata) or a run directory "
                         "with export/ or checkpoints/")

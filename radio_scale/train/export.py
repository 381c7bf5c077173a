"""Export a consolidated student + heads (safetensors + resolved config) for inference and evaluation."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from radio_scale.config import RunConfig, config_from_dict, config_to_yaml

import yaml


def export_student(model: nn.Module, cfg: RunConfig, specs, out_dir: Path, is_main: bool) -> Optional[Path]:
    """Gather the full student + heads (every rank takes part) and write them on rank 0; returns the dir there."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in full.items()
               if k.startswith(("student.", "heads.")) and isinstance(v, torch.Tensor)}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "radio_scale", "recipe": cfg.name})
    (tmp / "config.yaml").write_text(config_to_yaml(cfg))
    (tmp / "teachers.json").write_text(json.dumps([_spec_dict(s) for s in specs], indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def _spec_dict(spec) -> dict:
    try:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()}
    except TypeError:
        return dict(vars(spec))


def load_export(path: Path, device: str = "cpu"):
    """An exported directory -> (student, heads, cfg) in eval mode."""
    from radio_scale.models import AdaptorHeads, build_student
    from radio_scale.teachers.spec import teacher_spec

    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors (expected a radio_scale export directory)")
    cfg = config_from_dict(yaml.safe_load((path / "config.yaml").read_text()), src=str(path / "config.yaml"))
    specs = [teacher_spec(t) for t in cfg.teachers]
    student = build_student(cfg.student, [s.name for s in specs if s.has_summary])
    heads = AdaptorHeads(student.embed_dim, specs)
    state = load_file(str(path / "model.safetensors"), device=device)
    student.load_state_dict({k[len("student."):]: v for k, v in state.items() if k.startswith("student.")})
    heads.load_state_dict({k[len("heads."):]: v for k, v in state.items() if k.startswith("heads.")})
    return student.to(device).eval(), heads.to(device).eval(), cfg

"""Export a consolidated student + heads (safetensors + resolved config) for inference and evaluation.

Read it back with `radio_scale.eval.loading.load_student` (also reads checkpoints and run directories).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from radio_scale.config import RunConfig, config_to_yaml


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

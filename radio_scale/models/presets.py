"""Student ViT presets (pure data, importable without torch)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the schema is pure data too; imported for annotations only
    from radio_scale.config.schema import StudentConfig


@dataclass(frozen=True)
class ViTPreset:
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


STUDENT_PRESETS: dict[str, ViTPreset] = {
    # tiny sizes for tests and the smoke recipe
    "vit_pico16": ViTPreset(16, 64, 2, 2),
    "vit_tiny16": ViTPreset(16, 192, 12, 3),
    "vit_s16": ViTPreset(16, 384, 12, 6),
    "vit_b16": ViTPreset(16, 768, 12, 12),
    "vit_l16": ViTPreset(16, 1024, 24, 16),
    "vit_h16": ViTPreset(16, 1280, 32, 16),
    "vit_g14": ViTPreset(14, 1536, 40, 24, mlp_ratio=4.0),
}


def resolve_student_dims(sc: "StudentConfig") -> ViTPreset:
    """The student's architecture: its preset with any explicit patch_size/embed_dim/depth/num_heads applied."""
    if sc.arch not in STUDENT_PRESETS:
        raise ValueError(f"student.arch: unknown preset '{sc.arch}' (known: {', '.join(STUDENT_PRESETS)})")
    base = STUDENT_PRESETS[sc.arch]
    dims = ViTPreset(
        patch_size=sc.patch_size if sc.patch_size is not None else base.patch_size,
        embed_dim=sc.embed_dim if sc.embed_dim is not None else base.embed_dim,
        depth=sc.depth if sc.depth is not None else base.depth,
        num_heads=sc.num_heads if sc.num_heads is not None else base.num_heads,
        mlp_ratio=base.mlp_ratio,
    )
    for key in ("patch_size", "embed_dim", "depth", "num_heads"):
        if getattr(dims, key) <= 0:
            raise ValueError(f"student.{key} must be > 0, got {getattr(dims, key)}")
    if dims.embed_dim % dims.num_heads:
        raise ValueError(f"student.num_heads ({dims.num_heads}) must divide student.embed_dim ({dims.embed_dim})")
    return dims

"""Student ViT presets (pure data, importable without torch)."""
from __future__ import annotations

from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class ERadioPreset:
    dim: int  # C: channels of stage 1 (stages: C, 2C, 4C, 8C)
    depths: tuple[int, int, int, int]  # C2f bottlenecks in stages 1-2, transformer blocks in stages 3-4
    heads: tuple[int, int]  # attention heads in stages 3 and 4
    windows: tuple[int, int] = (8, 8)  # window side in stages 3 and 4 (in tokens of the map attended)
    mlp_ratio: float = 4.0
    upsample: bool = True

    @property
    def stride(self) -> int:
        return 16 if self.upsample else 32

    @property
    def out_dim(self) -> int:
        return 4 * self.dim if self.upsample else 8 * self.dim


ERADIO_PRESETS: dict[str, ERadioPreset] = {
    "eradio_pico": ERadioPreset(16, (1, 1, 2, 2), (2, 4), windows=(4, 4)),  # tests and the smoke recipe
    "eradio_b": ERadioPreset(128, (3, 3, 6, 7), (8, 16)),  # 118M in the paper (Table 6/7)
    "eradio_l": ERadioPreset(192, (3, 3, 5, 7), (12, 24)),  # 265M in the paper
}
for _name in list(ERADIO_PRESETS):
    ERADIO_PRESETS[_name + "_noup"] = replace(ERADIO_PRESETS[_name], upsample=False)  # "w/o upsample"


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

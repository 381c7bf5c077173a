"""Student ViT presets (pure data, importable without torch)."""
from __future__ import annotations

from dataclasses import dataclass


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

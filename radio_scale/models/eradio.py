"""E-RADIO (AM-RADIO §5.1): a hybrid CNN/transformer student.

- stem: two strided 3x3 convolutions (Conv-BN-SiLU), 4x downsampling, to C channels;
- stage 1 (stride 4, C) and stage 2 (stride 8, 2C): YOLOv8 C2f blocks, a strided 3x3 convolution before stage 2;
- stage 3 (stride 16, 4C) and stage 4 (stride 32, 8C): transformer blocks with windowed attention (SWIN-like
  windows, ViTDet-style zero padding to a multiple of the window) that interleave local windowed attention (even
  blocks) with "global" windowed attention (odd blocks): the map is average-pooled 2x, attended in windows, and the
  result upsampled (bilinear) back to the block's resolution. Each block starts with a depthwise 3x3 convolution
  (conditional position encoding), so any resolution works;
- upsampling of the final map (`upsample=True`): a 2x transposed convolution of the stage-4 map (8C -> 4C), added to
  the stage-3 map and mixed by a 3x3 convolution: the output is a stride-16 map of 4C channels. Without it (the
  paper's "w/o upsample" variant) the output is the stride-32 stage-4 map of 8C channels;
- summary: one Linear(D, D) per summary teacher on the global average of the output map (backbones.SummaryPool).

The FSDP2 wrap units are the two C2f stages and every transformer block; stem, downsampling convolutions, the
upsampler and the summary projections are in the root.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from radio_scale.models.backbones import BackboneStudent, CheckpointUnit, SummaryPool
from radio_scale.models.presets import ERADIO_PRESETS, ERadioPreset  # noqa: F401 (re-exported)


class ConvBN(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm -> SiLU, as YOLOv8's Conv."""

    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1, act: bool = True):
        super().__init__(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.SiLU() if act else nn.Identity())


class Bottleneck(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.cv1, self.cv2 = ConvBN(c, c, 3), ConvBN(c, c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8 C2f: 1x1 conv to 2c, split, n bottlenecks on the second half, concatenate every output, 1x1 conv."""

    def __init__(self, cin: int, cout: int, n: int, e: float = 0.5):
        super().__init__()
        self.c = int(cout * e)
        self.cv1 = ConvBN(cin, 2 * self.c, 1)
        self.cv2 = ConvBN((2 + n) * self.c, cout, 1)
        self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


def _windows(x: torch.Tensor, ws: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, H, W, C] -> [B*nW, ws*ws, C], zero-padding H, W to multiples of ws; returns the padded size."""
    b, h, w, c = x.shape
    x = F.pad(x, (0, 0, 0, (-w) % ws, 0, (-h) % ws))
    hp, wp = x.shape[1], x.shape[2]
    x = x.reshape(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c), (hp, wp)


def _unwindows(x: torch.Tensor, b: int, padded: tuple[int, int], hw: tuple[int, int], ws: int) -> torch.Tensor:
    hp, wp = padded
    c = x.shape[-1]
    x = x.reshape(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    return x[:, :hw[0], :hw[1]]


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, T, C]
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, c))


class WindowBlock(nn.Module):
    """Transformer block on a [B, C, H, W] map: local windowed attention, or (global=True) windowed attention on
    the 2x average-pooled map, upsampled back (ViTDet-style interleaving, as in E-RADIO)."""

    def __init__(self, dim: int, heads: int, window: int, is_global: bool, mlp_ratio: float = 4.0):
        super().__init__()
        self.window, self.is_global = window, is_global
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = WindowAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos(x)
        b, c, h, w = x.shape
        y = x
        if self.is_global:
            y = F.avg_pool2d(y, 2, ceil_mode=True)
        hw = (y.shape[2], y.shape[3])
        tokens, padded = _windows(self.norm1(y.permute(0, 2, 3, 1)), self.window)
        y = _unwindows(self.attn(tokens), b, padded, hw, self.window).permute(0, 3, 1, 2)
        if self.is_global:
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        x = x + y
        t = x.permute(0, 2, 3, 1)
        return (t + self.mlp(self.norm2(t))).permute(0, 3, 1, 2)


class ERadioStudent(BackboneStudent):
    """E-RADIO under the student contract (see radio_scale.models.backbones)."""

    def __init__(self, preset: ERadioPreset, summary_teachers: Sequence[str]):
        super().__init__(summary_teachers)
        c, (d1, d2, d3, d4) = preset.dim, preset.depths
        self.preset = preset
        self.patch_size = preset.stride
        self.embed_dim = preset.out_dim
        self.stem = nn.Sequential(ConvBN(3, c // 2, 3, 2), ConvBN(c // 2, c, 3, 2))
        self.stage1 = CheckpointUnit(C2f(c, c, d1))
        self.down2 = ConvBN(c, 2 * c, 3, 2)
        self.stage2 = CheckpointUnit(C2f(2 * c, 2 * c, d2))
        self.down3 = ConvBN(2 * c, 4 * c, 3, 2)
        self.stage3 = nn.ModuleList(
            CheckpointUnit(WindowBlock(4 * c, preset.heads[0], preset.windows[0], i % 2 == 1, preset.mlp_ratio))
            for i in range(d3))
        self.down4 = ConvBN(4 * c, 8 * c, 3, 2)
        self.stage4 = nn.ModuleList(
            CheckpointUnit(WindowBlock(8 * c, preset.heads[1], preset.windows[1], i % 2 == 1, preset.mlp_ratio))
            for i in range(d4))
        if preset.upsample:
            self.up = nn.ConvTranspose2d(8 * c, 4 * c, 2, 2)
            self.fuse = ConvBN(4 * c, 4 * c, 3)
        self.summary_pool = SummaryPool(self.embed_dim, self.summary_teachers)
        self._units = [self.stage1, self.stage2, *self.stage3, *self.stage4]
        self._match_norm_stats_dtype()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down2(self.stage1(self.stem(images))))
        x = self.down3(x)
        for blk in self.stage3:
            x = blk(x)
        x3 = x
        x = self.down4(x)
        for blk in self.stage4:
            x = blk(x)
        if self.preset.upsample:
            x = self.fuse(self.up(x)[:, :, :x3.shape[2], :x3.shape[3]] + x3)
        return x

"""The student backbone: a ViT with CPE, one CLS token per summary teacher, registers and per-call windowed attention."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath
from torch import nn

from radio_scale.config.schema import StudentConfig
from radio_scale.models.cpe import CroppedPosEmbed
from radio_scale.models.flops import is_windowed
from radio_scale.models.presets import ViTPreset, resolve_student_dims
from radio_scale.models.spectral import SpectralLinear, make_linear


class StudentOutput(NamedTuple):
    """Student features: one summary vector [B, D] per summary teacher, and patch features [B, D, h, w].

    A NamedTuple (not a dataclass): DeepSpeed ZeRO-3 finds the tensors of a module's output in tuples and dicts
    only, and hooks them to gather the student's own parameters (prefix tokens) again for backward."""

    summary: dict[str, torch.Tensor]
    patches: torch.Tensor


def _to_windows(t: torch.Tensor, grid: tuple[int, int], ws: int) -> torch.Tensor:
    """[B, H, h*w, c] patch tokens -> [B*nW, H, ws*ws, c], zero-padding the grid to multiples of ws (as ViTDet)."""
    b, heads, _, c = t.shape
    h, w = grid
    t = t.reshape(b, heads, h, w, c)
    t = F.pad(t, (0, 0, 0, (-w) % ws, 0, (-h) % ws))
    hp, wp = t.shape[2], t.shape[3]
    t = t.reshape(b, heads, hp // ws, ws, wp // ws, ws, c).permute(0, 2, 4, 1, 3, 5, 6)
    return t.reshape(-1, heads, ws * ws, c)


def _from_windows(t: torch.Tensor, batch: int, grid: tuple[int, int], ws: int) -> torch.Tensor:
    """Inverse of _to_windows: [B*nW, H, ws*ws, c] -> [B, H, h*w, c], dropping the padding."""
    h, w = grid
    nh, nw = -(-h // ws), -(-w // ws)
    heads, c = t.shape[1], t.shape[3]
    t = t.reshape(batch, nh, nw, heads, ws, ws, c).permute(0, 3, 1, 4, 2, 5, 6)
    t = t.reshape(batch, heads, nh * ws, nw * ws, c)[:, :, :h, :w]
    return t.reshape(batch, heads, h * w, c)


class Attention(nn.Module):
    """Multi-head self-attention over [prefix tokens | patch tokens], global or in windows over the patch grid."""

    def __init__(self, dim: int, num_heads: int, num_prefix_tokens: int, spectral: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.num_prefix_tokens = num_prefix_tokens
        self.qkv = make_linear(dim, 3 * dim, spectral)
        self.proj = make_linear(dim, dim, spectral)

    def forward(self, x: torch.Tensor, window_size: int, grid: tuple[int, int]) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if is_windowed(window_size, grid):
            out = self._windowed(q, k, v, window_size, grid)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def _windowed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ws: int,
                  grid: tuple[int, int]) -> torch.Tensor:
        # Patches attend within their w×w window *and* to the prefix tokens; prefix tokens attend to every
        # token. So each summary (CLS) token still aggregates the whole image in every block, patches get a
        # global context through the prefix tokens, and with one window covering the grid this is exactly
        # global attention (the same weights serve both modes).
        b, heads, _, c = q.shape
        p = self.num_prefix_tokens
        qw, kw, vw = (_to_windows(t[:, :, p:], grid, ws) for t in (q, k, v))
        n_windows = qw.shape[0] // b
        if p:
            def with_prefix(win: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                pre = t[:, :, :p].unsqueeze(1).expand(b, n_windows, heads, p, c).reshape(-1, heads, p, c)
                return torch.cat([pre, win], dim=2)

            kw, vw = with_prefix(kw, k), with_prefix(vw, v)
        mask = None
        h, w = grid
        if h % ws or w % ws:
            # Padded positions must not be attended to (ViTDet attends to zero-padded tokens; masking them
            # keeps a window's result independent of where the grid ends).
            ones = torch.ones(1, 1, h * w, 1, device=q.device)
            valid = _to_windows(ones, grid, ws)[:, 0, :, 0] > 0  # [nW, ws*ws], False where padded
            valid = torch.cat([valid.new_ones(n_windows, p), valid], dim=1)
            mask = valid[None, :, None, None, :].expand(b, -1, -1, -1, -1).reshape(b * n_windows, 1, 1, -1)
        out = _from_windows(F.scaled_dot_product_attention(qw, kw, vw, attn_mask=mask), b, grid, ws)
        if p:
            out = torch.cat([F.scaled_dot_product_attention(q[:, :, :p], k, v), out], dim=2)
        return out


class Mlp(nn.Module):
    """Linear → GELU → Linear."""

    def __init__(self, dim: int, hidden: int, spectral: bool = False):
        super().__init__()
        self.fc1 = make_linear(dim, hidden, spectral)
        self.act = nn.GELU()
        self.fc2 = make_linear(hidden, dim, spectral)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; `always_global` blocks ignore the window size they are given."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, num_prefix_tokens: int,
                 spectral: bool = False, drop_path: float = 0.0, always_global: bool = False):
        super().__init__()
        self.always_global = always_global
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, num_prefix_tokens, spectral)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), spectral)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self._spectral = [m for m in self.modules() if isinstance(m, SpectralLinear)]
        self._checkpointing = False
        self._spectral_advance = True

    @property
    def checkpointing(self) -> bool:
        """Recompute this block's activations in backward instead of keeping them.

        A switch, not a wrapper module: parameter names, FSDP2 units and checkpoints are the same either way,
        and the trainer can set it per micro-batch, so each rank follows the plan of the group it computes.
        """
        return self._checkpointing

    @checkpointing.setter
    def checkpointing(self, on: bool) -> None:
        self._checkpointing = bool(on)

    @property
    def spectral_advance(self) -> bool:
        """Whether this block's σReparam layers take a power-iteration step in the next training forward.

        The trainer turns it on for the first micro-batch of a step only, so σ advances once per optimisation
        step on every rank, however many micro-batches a rank computes (one group or several). Setting it arms
        (or disarms) each layer once: the layer steps inside its own forward, where a sharded weight is gathered,
        and the recomputation of activation checkpointing finds it spent.
        """
        return self._spectral_advance

    @spectral_advance.setter
    def spectral_advance(self, on: bool) -> None:
        self._spectral_advance = bool(on)
        self._sync_spectral()

    def _sync_spectral(self) -> None:
        for m in self._spectral:
            m.advance_pending = self._spectral_advance

    def forward(self, x: torch.Tensor, window_size: int, grid: tuple[int, int]) -> torch.Tensor:
        """x: [B, prefix + h*w, D]; window_size 0 = global; grid = (h, w) of the patch tokens."""
        if self._checkpointing:
            if torch.is_grad_enabled():
                # non-reentrant: works inside FSDP2 units; the RNG state is replayed, so DropPath masks match
                return torch.utils.checkpoint.checkpoint(self._forward, x, window_size, grid, use_reentrant=False)
        return self._forward(x, window_size, grid)

    def _forward(self, x: torch.Tensor, window_size: int, grid: tuple[int, int]) -> torch.Tensor:
        ws = 0 if self.always_global else window_size
        x = x + self.drop_path(self.attn(self.norm1(x), ws, grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class RadioStudent(nn.Module):
    """ViT student: patch embedding + CPE, [summary tokens | registers | patches], blocks, final norm."""

    def __init__(self, dims: ViTPreset, summary_teachers: Sequence[str], cpe_grid: int = 128,
                 cpe_scale: tuple[float, float] = (0.5, 1.0), cpe_ratio: tuple[float, float] = (0.75, 1.3333),
                 num_registers: int = 0, global_blocks: Sequence[int] = (), window_sizes: Sequence[int] = (0,),
                 spectral_reparam: bool = False, drop_path: float = 0.0):
        super().__init__()
        if len(set(summary_teachers)) != len(summary_teachers):
            raise ValueError(f"student summary teachers must be unique, got {list(summary_teachers)}")
        for i in global_blocks:
            if not 0 <= i < dims.depth:
                raise ValueError(f"student.global_blocks: block {i} does not exist (depth {dims.depth})")
        if num_registers < 0:
            raise ValueError(f"student.num_registers must be >= 0, got {num_registers}")
        d = dims.embed_dim
        self.embed_dim = d
        self.patch_size = dims.patch_size
        self.summary_teachers = tuple(summary_teachers)
        self.num_registers = num_registers
        self.num_prefix_tokens = len(self.summary_teachers) + num_registers
        self.global_blocks = tuple(sorted(set(global_blocks)))
        self.window_sizes = tuple(window_sizes)  # the trainer samples one per step

        self.patch_embed = nn.Conv2d(3, d, kernel_size=dims.patch_size, stride=dims.patch_size)
        self.cpe = CroppedPosEmbed(d, cpe_grid, cpe_scale, cpe_ratio)
        self.prefix_tokens = nn.Parameter(torch.zeros(1, self.num_prefix_tokens, d))
        drop = [drop_path * i / max(dims.depth - 1, 1) for i in range(dims.depth)]
        self.blocks = nn.ModuleList(
            Block(d, dims.num_heads, dims.mlp_ratio, self.num_prefix_tokens, spectral_reparam, drop[i],
                  always_global=i in self.global_blocks)
            for i in range(dims.depth)
        )
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        nn.init.normal_(self.prefix_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            if isinstance(m, SpectralLinear):
                m.reset_spectral()  # γ = σ(W) of the re-initialised weight

    def set_activation_checkpointing(self, on: bool) -> None:
        """Recompute every block's activations in backward (True) or keep them (False), from the next forward."""
        for blk in self.blocks:
            blk.checkpointing = bool(on)

    def set_spectral_advance(self, on: bool) -> None:
        """σReparam: take a power-iteration step in the next training forward (True) or reuse the estimate."""
        for blk in self.blocks:
            blk.spectral_advance = bool(on)

    def forward(self, images: torch.Tensor, window_size: Optional[int] = None) -> StudentOutput:
        """images [B, 3, H, W] (H, W multiples of the patch size); window_size None/0: global attention."""
        ws = window_size or 0
        if ws < 0:
            raise ValueError(f"student window_size must be >= 0 (0 or None = global), got {window_size}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"student input must be [B, 3, H, W], got {list(images.shape)}")
        b, _, height, width = images.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"student input {height}x{width} is not a multiple of the patch size {p}")
        grid = (height // p, width // p)
        x = self.patch_embed(images)
        x = x + self.cpe(grid[0], grid[1], b).to(x.dtype)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.prefix_tokens.to(x.dtype).expand(b, -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x, ws, grid)
        x = self.norm(x)
        # Outputs are copies, not views of x (FSDP2 warns that in-place ops on a returned view would skip
        # its backward hook). The patch map is stored channels-last: its memory is the token layout
        # [B, h, w, D], so per-token heads read it without another copy.
        summary = {name: x[:, i].clone() for i, name in enumerate(self.summary_teachers)}
        patches = (x[:, self.num_prefix_tokens:].reshape(b, *grid, self.embed_dim).permute(0, 3, 1, 2)
                   .contiguous(memory_format=torch.channels_last))
        return StudentOutput(summary=summary, patches=patches)


def build_student(sc: StudentConfig, summary_teachers: Sequence[str]) -> RadioStudent:
    """The student described by `sc`, with one summary token per teacher in `summary_teachers`."""
    for w in sc.window_sizes:
        if w < 0:
            raise ValueError(f"student.window_sizes holds {w}; use 0 for global attention")
    return RadioStudent(
        resolve_student_dims(sc),
        list(summary_teachers),
        cpe_grid=sc.cpe_grid,
        cpe_scale=tuple(sc.cpe_scale),
        cpe_ratio=tuple(sc.cpe_ratio),
        num_registers=sc.num_registers,
        global_blocks=sc.global_blocks,
        window_sizes=sc.window_sizes,
        spectral_reparam=sc.spectral_reparam,
        drop_path=sc.drop_path,
    )

"""Throughput (images/s), FLOPs (analytic and counted) and model FLOP utilisation."""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: nn.Module, *inputs: torch.Tensor, on_meta: bool = True, **kwargs) -> int:
    """FLOPs that torch's FlopCounterMode counts for one call of `model(*inputs)`.

    on_meta runs a meta-device copy: no compute, and SDPA is counted (the CPU fused kernel
    is not, which would silently drop the attention FLOPs).
    """
    if on_meta:
        model = copy.deepcopy(model).to("meta")
        inputs = tuple(x.to("meta") for x in inputs)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*inputs, **kwargs)
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", n: Optional[int] = None, iters: int = 10
) -> float:
    """Achieved FLOP/s of a large square matmul on this device and dtype (a measured peak)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


@dataclass(frozen=True)
class ThroughputResult:
    """Timed inference: images per second and seconds per batch at one (resolution, batch)."""

    resolution: int
    batch_size: int
    images_per_s: float
    s_per_batch: float
    flops_per_image: Optional[int] = None
    peak_flops: Optional[float] = None

    @property
    def mfu(self) -> Optional[float]:
        """Model FLOP utilisation: achieved FLOP/s over the peak."""
        if not self.flops_per_image or not self.peak_flops:
            return None
        return self.flops_per_image * self.images_per_s / self.peak_flops

    def as_dict(self) -> dict[str, float]:
        """Flat metrics for reports."""
        out = {"images_per_s": self.images_per_s, "s_per_batch": self.s_per_batch,
               "resolution": self.resolution, "batch_size": self.batch_size}
        if self.flops_per_image:
            out["gflops_per_image"] = self.flops_per_image / 1e9
        if self.peak_flops:
            out["peak_tflops"] = self.peak_flops / 1e12
        if self.mfu is not None:
            out["mfu"] = self.mfu
        return out


@torch.no_grad()
def measure_throughput(
    fn: Callable[[torch.Tensor], object],
    resolution: int,
    batch_size: int,
    warmup: int = 2,
    iters: int = 5,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    flops_per_image: Optional[int] = None,
    peak_flops: Optional[float] = None,
) -> ThroughputResult:
    """Images/s of `fn` on random [batch, 3, res, res] inputs: warm-up calls, then timed calls."""
    device = torch.device(device)
    x = torch.randn(batch_size, 3, resolution, resolution, device=device)
    # bf16 only through autocast on accelerators; on CPU it is tens of times slower than fp32
    amp = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 and device.type != "cpu"
           else contextlib.nullcontext())
    with amp:
        for _ in range(warmup):
            fn(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(x)
        _sync(device)
    elapsed = time.perf_counter() - t0
    return ThroughputResult(resolution, batch_size, batch_size * iters / elapsed, elapsed / iters,
                            flops_per_image, peak_flops)


def flop_crosscheck(model: nn.Module, arch, resolution: int, num_summary_tokens: int, window_size: int = 0) -> dict[str, float]:
    """Analytic forward FLOPs of one image (radio_scale.models.flops) next to FlopCounterMode's count.

    arch: a StudentConfig or ViTPreset describing `model`'s trunk.
    """
    from radio_scale.models.flops import student_forward_flops

    if hasattr(model, "forward_flops"):  # E-RADIO / timm students report their own count (registry contract)
        analytic = model.forward_flops(resolution)
    else:
        analytic = student_forward_flops(arch, resolution, window_size=window_size,
                                         num_summary_tokens=num_summary_tokens)
    kwargs = {"window_size": window_size or None} if window_size else {}
    counted = count_flops(model, torch.zeros(1, 3, resolution, resolution), **kwargs)
    return {
        "analytic_gflops": analytic / 1e9,
        "counted_gflops": counted / 1e9,
        "rel_diff": abs(counted - analytic) / max(analytic, 1.0),
    }

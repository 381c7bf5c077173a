"""Adaptor heads: per teacher, an MLP from the student's summary token and one from its patch features."""
from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, Sequence

import torch
from torch import nn

from radio_scale.models.student import StudentOutput


class TeacherSpec(Protocol):
    """What a head needs to know about a teacher (a Teacher satisfies it)."""

    name: str
    embed_dim: int
    summary_dim: int
    has_summary: bool


class HeadOutput(NamedTuple):
    """One teacher's predictions: summary [B, summary_dim] (None without a summary head), spatial [B, embed_dim, h, w]."""

    summary: Optional[torch.Tensor]
    spatial: torch.Tensor


class _ZeroLink(torch.autograd.Function):
    """A scalar 0 that depends on `tensors`: in backward every one of them gets an exact zero gradient.

    This is how an unused head takes part in FSDP's gradient reduction without its output entering any
    arithmetic: 0 × output would be NaN when the output overflows (0 × inf) and would skip a good step.
    """

    @staticmethod
    def forward(ctx, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.specs = [(t.shape, t.dtype, t.device) for t in tensors]
        return torch.zeros((), dtype=tensors[0].dtype, device=tensors[0].device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.specs)


def zero_link(*tensors: torch.Tensor) -> torch.Tensor:
    """0, with exact zero gradients for `tensors` whatever their values (inf and NaN included)."""
    return _ZeroLink.apply(*tensors)


class _Join(torch.autograd.Function):
    """Identity on several tensors, as one autograd node: their gradients leave it together, so backward reaches
    every head at the same moment and visits them in reverse construction order on every rank, whichever heads a
    rank's group uses. DeepSpeed ZeRO-3 gathers each head's parameters in backward in that visiting order, which
    must be the same on all ranks."""

    @staticmethod
    def forward(ctx, *tensors):
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        return grads


def join(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """`tensors` through one identity node (see _Join)."""
    return list(_Join.apply(*tensors)) if tensors else []


class AdaptorMLP(nn.Sequential):
    """Linear → LayerNorm → GELU → Linear (the paper's adaptor)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class AdaptorHeads(nn.Module):
    """Summary and spatial heads of every teacher of the run.

    Hidden width = the largest teacher width (embed_dim or summary_dim) over all teachers. Every head exists
    on every rank. FSDP is SPMD: a head that one rank skips while another runs it desynchronises the
    all-gathers / reduce-scatters (or leaves a gradient None on one rank only). So `forward(out, names)`
    by default also runs every head *not* in `names` on a single token and links its output to the first
    requested spatial prediction through `zero_link` (adds an exact 0 whatever the output's value, inf
    included): every rank runs every head, in construction order, and the unused heads receive exact zero
    gradients through the loss of that prediction (its values are unchanged). The trainer
    only has to pass its group's teacher names and use the first teacher's spatial prediction in the loss.
    """

    def __init__(self, student_dim: int, teachers: Sequence[TeacherSpec]):
        super().__init__()
        if not teachers:
            raise ValueError("adaptor heads need at least one teacher")
        names = [t.name for t in teachers]
        for n in names:
            if not n or "." in n or names.count(n) > 1:
                raise ValueError(f"teacher name '{n}' cannot name a head (empty, contains '.', or repeated)")
        self.teacher_names = tuple(names)
        self.hidden_dim = max(max(t.embed_dim, t.summary_dim if t.has_summary else 0) for t in teachers)
        self.summary = nn.ModuleDict(
            {t.name: AdaptorMLP(student_dim, self.hidden_dim, t.summary_dim) for t in teachers if t.has_summary}
        )
        self.spatial = nn.ModuleDict({t.name: AdaptorMLP(student_dim, self.hidden_dim, t.embed_dim) for t in teachers})

    def forward(self, out: StudentOutput, names: Optional[Sequence[str]] = None,
                run_unused: bool = True, linked: bool = True) -> dict[str, HeadOutput]:
        """Predictions for `names` (None: every teacher); unused heads run at zero weight unless run_unused=False.

        linked=False: the unused heads' outputs (one token each) are returned too, under their teachers' names,
        for the caller to join to its loss (DistillModel and the trainer do, so that every output of every
        module receives a gradient on every rank, as DeepSpeed ZeRO-3's per-module gathers need)."""
        names = list(self.teacher_names if names is None else names)
        if not names:
            raise ValueError("adaptor heads: no teacher requested")
        for n in names:
            if n not in self.spatial:
                raise ValueError(f"adaptor heads: unknown teacher '{n}' (heads: {', '.join(self.teacher_names)})")
        wanted = set(names)
        for n in names:
            if n in self.summary and n not in out.summary:
                raise ValueError(f"adaptor heads: the student has no summary token for teacher '{n}'")
        preds: dict[str, HeadOutput] = {}
        token = out.patches[:1, :, 0, 0]  # [1, D]: the cheapest valid input for an unused head
        # Always visit the heads in the same (construction) order on every rank, so that heads sharded on
        # their own issue their all-gathers in the same order everywhere.
        for n in self.teacher_names:
            if n in wanted:
                summary = self.summary[n](out.summary[n]) if n in self.summary else None
                preds[n] = HeadOutput(summary, self._spatial(n, out.patches))
            elif run_unused:
                # an unused summary head reads its own summary token, so every student output joins the backward
                src = out.summary[n][:1] if n in out.summary else token
                preds[n] = HeadOutput(self.summary[n](src) if n in self.summary else None, self.spatial[n](token))
        # one identity node over every output: backward then meets every head at once (same order on all ranks)
        joined = iter(join([t for o in preds.values() for t in o if t is not None]))
        preds = {n: HeadOutput(*(None if t is None else next(joined) for t in o)) for n, o in preds.items()}
        if not linked:
            return preds
        unused = [t for n, o in preds.items() if n not in wanted for t in o if t is not None]
        preds = {n: preds[n] for n in names}
        if unused:
            first = names[0]
            preds[first] = HeadOutput(preds[first].summary, preds[first].spatial + zero_link(*unused).to(
                preds[first].spatial.dtype))
        return preds

    def _spatial(self, name: str, patches: torch.Tensor) -> torch.Tensor:
        # [B, D, h, w] -> tokens [B, h, w, D] -> [B, C, h, w]; free of copies when patches are channels-last.
        return self.spatial[name](patches.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

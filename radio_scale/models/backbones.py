"""Non-ViT students (E-RADIO, any timm model) under the one student contract of `RadioStudent`.

Contract (what the trainer, the planner, export and evaluation use):
- forward(images [B, 3, H, W], window_size=None) -> StudentOutput(summary={teacher: [B, D]}, patches [B, D, h, w]),
  h = H // stride; `window_size` is accepted and ignored (these students have fixed attention windows, if any);
- `embed_dim` (D), `patch_size` (the output stride), `summary_teachers`;
- `blocks`: the FSDP2 wrap units (a plain list, not registered twice: parameter names stay those of the model);
- set_activation_checkpointing(on) per wrap unit; set_spectral_advance(on) (a no-op: no σReparam here);
- `cpe.generator`: the trainer seeds it every step; these students draw no randomness from it;
- forward_flops(resolution) and train_activation_bytes(resolution, checkpointing): the figures the planner uses,
  measured on a meta-device copy (torch.utils.flop_counter.FlopCounterMode; saved-for-backward tensor bytes).

Summary features: one Linear(D, D) per summary teacher on the global average of the final map (a per-teacher
projection of the pooled features; the adaptor heads then map it to each teacher's summary dimension).
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from radio_scale.models.heads import zero_link
from radio_scale.models.student import StudentOutput


class RngHolder:
    """Stands in for the ViT's CPE module where the trainer sets and reseeds `student.cpe.generator`."""

    def __init__(self):
        self.generator: Optional[torch.Generator] = None


class CheckpointUnit(nn.Module):
    """An FSDP2 wrap unit with a per-call activation-checkpointing switch (like Block.checkpointing)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.checkpointing = False

    def forward(self, *args, **kwargs):
        if self.checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.inner, *args, use_reentrant=False, **kwargs)
        return self.inner(*args, **kwargs)


class SummaryPool(nn.Module):
    """One Linear(D, D) per summary teacher on the global average of the final map.

    The per-teacher projections are the row blocks of one Linear(D, n*D): a teacher whose summary a rank does not
    use still gets (zero) gradients through the shared weight, so every rank reduce-scatters the same tensors
    under FSDP2 (a separate Linear per teacher would have no gradient on ranks without that teacher).
    """

    def __init__(self, dim: int, teachers: Sequence[str]):
        super().__init__()
        self.teachers = tuple(teachers)
        self.dim = dim
        self.proj = nn.Linear(dim, dim * max(len(self.teachers), 1))

    def forward(self, fmap: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.proj(fmap.mean(dim=(2, 3)))
        return {t: z[:, i * self.dim:(i + 1) * self.dim].clone() for i, t in enumerate(self.teachers)}


def _bn_stats_to_input(m: nn.Module, args) -> None:
    # the statistics follow the parameters' dtype (bf16 under FSDP2's bf16 policy); under autocast the parameters
    # stay fp32 while the input is bf16, and batch norm takes fp32 statistics with them
    x = args[0]
    dtype = m.weight.dtype if m.weight is not None else (x.dtype if isinstance(x, torch.Tensor) else None)
    if isinstance(x, torch.Tensor) and m.running_mean is not None and m.running_mean.dtype != dtype \
            and dtype in (torch.bfloat16, torch.float16):
        m._radio_stats_dtype = m.running_mean.dtype
        m._radio_stats_fp = (m.running_mean, m.running_var)
        m.running_mean, m.running_var = m.running_mean.to(dtype), m.running_var.to(dtype)


def _bn_stats_back(m: nn.Module, _args, _out) -> None:
    saved = getattr(m, "_radio_stats_fp", None)
    if saved is not None:
        mean, var = saved
        with torch.no_grad():
            mean.copy_(m.running_mean)
            var.copy_(m.running_var)
        m.running_mean, m.running_var = mean, var
        m._radio_stats_fp = None


def _norm_stats(module: nn.Module) -> list[torch.Tensor]:
    """The running statistics (mean, var) of every BatchNorm in `module`, in module order."""
    return [t for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for t in (m.running_mean, m.running_var) if t is not None]


def _sync_norm_stats(module: nn.Module, *_args) -> None:
    """state_dict pre-hook: average the BatchNorm running statistics over the ranks before they are read.

    Each rank updates its own copy of these buffers from its own batches, so the copies drift apart, and a
    checkpoint keeps one copy per buffer (DCP writes a replicated tensor once, from whichever rank its plan picks)
    while an export keeps rank 0's: a resume would hand every rank statistics it never had. Every checkpoint and
    export reads the state dict on all ranks at the same point (get_model_state_dict is collective), so averaging
    here makes the copies equal wherever they are saved: the saved state is the live state of every rank, and a
    run resumed from it continues bit for bit as the uninterrupted one (which averaged at the same step)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    stats = _norm_stats(module)
    if not stats:
        return
    with torch.no_grad():
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in stats])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for t, v in zip(stats, flat.split([t.numel() for t in stats])):
            t.copy_(v.view_as(t))


class BackboneStudent(nn.Module):
    """Base of the non-ViT students: subclasses set embed_dim, patch_size, units and implement features()."""

    embed_dim: int
    patch_size: int

    def __init__(self, summary_teachers: Sequence[str]):
        super().__init__()
        if len(set(summary_teachers)) != len(summary_teachers):
            raise ValueError(f"student summary teachers must be unique, got {list(summary_teachers)}")
        self.summary_teachers = tuple(summary_teachers)
        self.window_sizes = (0,)
        self.cpe = RngHolder()
        self._units: list[CheckpointUnit] = []
        self._flops_cache: dict = {}
        self.register_state_dict_pre_hook(_sync_norm_stats)

    def _match_norm_stats_dtype(self) -> None:
        """BatchNorm under FSDP2's bf16 parameter policy: its parameters arrive in bf16 while its running
        statistics (buffers) stay fp32, which F.batch_norm refuses. Each BatchNorm runs with its statistics cast to
        the input's dtype and writes the updated statistics back in their own dtype (fp32 master)."""
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not getattr(m, "_radio_stats_hook", False):
                m.register_forward_pre_hook(_bn_stats_to_input)
                m.register_forward_hook(_bn_stats_back)
                m._radio_stats_hook = True

    @property
    def blocks(self) -> list[nn.Module]:
        """The FSDP2 wrap units (stages or blocks), in forward order."""
        return list(self._units)

    def set_activation_checkpointing(self, on: bool) -> None:
        for u in self._units:
            u.checkpointing = bool(on)

    def set_spectral_advance(self, on: bool) -> None:  # no σReparam layers
        return None

    def features(self, images: torch.Tensor) -> torch.Tensor:  # [B, D, h, w]
        raise NotImplementedError

    def forward(self, images: torch.Tensor, window_size: Optional[int] = None) -> StudentOutput:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"student input must be [B, 3, H, W], got {list(images.shape)}")
        s = self.patch_size
        if images.shape[2] % s or images.shape[3] % s:
            raise ValueError(f"student input {images.shape[2]}x{images.shape[3]} is not a multiple of the "
                             f"student's stride {s}")
        fmap = self.features(images)
        summary = self.summary_pool(fmap)
        if summary:
            # The summary projection joins the patch map's graph with an exact zero: a rank whose group uses no
            # summary (the heads then read patches only) still gives it a (zero) gradient, as every rank must
            # reduce-scatter the same tensors under FSDP2 (the ViT's summary tokens share its blocks' graph).
            fmap = fmap + zero_link(*summary.values()).to(fmap.dtype)
        return StudentOutput(summary=summary, patches=fmap.contiguous(memory_format=torch.channels_last))

    # ------------------------------------------------------------------ cost figures (meta device)
    def _meta_copy(self, dtype: torch.dtype = torch.float32) -> "BackboneStudent":
        twin = copy.deepcopy(self).to("meta").to(dtype)
        twin._units = [m for m in twin.modules() if isinstance(m, CheckpointUnit)]
        return twin

    def forward_flops(self, resolution, window_size: int = 0) -> float:
        """Forward FLOPs of one image (FlopCounterMode on a meta copy; 1 MAC = 2 FLOPs; heads not included)."""
        from torch.utils.flop_counter import FlopCounterMode

        hw = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        if hw not in self._flops_cache:
            twin = self._meta_copy()
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                twin(torch.empty(1, 3, *hw, device="meta"))
            self._flops_cache[hw] = float(counter.get_total_flops())
        return self._flops_cache[hw]

    def train_activation_bytes(self, resolution, checkpointing: bool, dtype: torch.dtype = torch.bfloat16) -> float:
        """Bytes one image keeps for backward (tensors saved by autograd, measured on a meta copy in `dtype`).

        With checkpointing, a wrap unit keeps only its input, and one unit at a time is recomputed in full.
        """
        hw = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        twin = self._meta_copy(dtype)
        twin.train()
        current: list[Optional[int]] = [None]
        per_unit = [0] * len(twin._units)
        inputs = [0] * len(twin._units)
        total = [0]

        def pack(t):
            n = t.numel() * t.element_size()
            total[0] += n
            if current[0] is not None:
                per_unit[current[0]] += n
            return t

        hooks = []
        for i, u in enumerate(twin._units):
            def pre(_m, args, i=i):
                current[0] = i
                inputs[i] = sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))

            def post(_m, _a, _o):
                current[0] = None

            hooks += [u.register_forward_pre_hook(pre), u.register_forward_hook(post)]
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                twin(torch.empty(1, 3, *hw, device="meta", dtype=dtype))
        finally:
            for h in hooks:
                h.remove()
        if not checkpointing:
            return float(total[0])
        outside = total[0] - sum(per_unit)
        return float(outside + sum(inputs) + max(per_unit, default=0))

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _probe_size(model: nn.Module, img_size) -> int:
    """An input side the timm model accepts (models with fixed windows need their img_size)."""
    if img_size is None:
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is None:
        img_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1]
    return int(img_size[0] if isinstance(img_size, (tuple, list)) else img_size)


def _used_modules(model: nn.Module, side: int) -> tuple[set, set]:
    """(names of the modules forward_features calls, names of the parameters that receive a gradient), measured
    on a meta-device copy (no memory, no compute)."""
    twin = copy.deepcopy(model).to("meta")
    called: set = set()
    hooks = [m.register_forward_pre_hook(lambda _m, _a, n=n: called.add(n)) for n, m in twin.named_modules()]
    try:
        with torch.enable_grad():  # the model may be built under no_grad (e.g. loaded for evaluation)
            out = twin.forward_features(torch.empty(1, 3, side, side, device="meta"))
            out.float().sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return called, {n for n, p in twin.named_parameters() if p.grad is not None}


def _prune_unused(model: nn.Module, img_size=None) -> tuple[str, ...]:
    """Replace by nn.Identity every submodule of the timm model that forward_features never calls and whose
    parameters get no gradient (the classifier head's norm/pre-logits layers kept with num_classes=0): they would
    be trained by nothing, and a parameter that never gets a gradient gets no optimizer state, so a checkpoint of
    the run could not be resumed (DCP expects optimizer state for every parameter). Returns the pruned names."""
    try:
        side = _probe_size(model, img_size)
        called, with_grad = _used_modules(model, side)
    except Exception:  # a model the probe cannot run stays as it is
        return ()
    pruned: list[str] = []

    def walk(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            full = f"{prefix}{name}"
            params = [f"{full}.{n}" for n, _ in child.named_parameters()]
            if full not in called and params and not any(p in with_grad for p in params):
                setattr(parent, name, nn.Identity())
                pruned.append(full)
            elif full in called:
                walk(child, full + ".")

    walk(model, "")
    if pruned:
        _used_modules(model, side)  # the pruned model must still run (raises otherwise)
    return tuple(pruned)


class TimmStudent(BackboneStudent):
    """Any timm model as the student: its last stage's map (forward_features) is the patch map.

    The model's top-level stage list (`stages`, `layers` or `blocks`) becomes the FSDP2 wrap units, each wrapped
    in a CheckpointUnit (parameter names gain `.inner`); models without one are a single unit. Layers that
    forward_features never uses (what is left of the classifier head) are removed (`pruned`: their names).
    """

    UNIT_LISTS = ("stages", "layers", "blocks")

    def __init__(self, name: str, summary_teachers: Sequence[str], timm_kwargs: Optional[dict] = None):
        super().__init__(summary_teachers)
        import timm

        if not timm.is_model(name):
            raise ValueError(f"student.arch: timm has no model '{name}'")
        kwargs = dict(timm_kwargs or {})
        kwargs.setdefault("num_classes", 0)
        self.timm_name = name
        self.model = timm.create_model(name, pretrained=False, **kwargs)
        for attr in self.UNIT_LISTS:
            seq = getattr(self.model, attr, None)
            if isinstance(seq, (nn.Sequential, nn.ModuleList)) and len(seq) > 0:
                for i in range(len(seq)):
                    seq[i] = CheckpointUnit(seq[i])
                self._units = list(seq)
                break
        if not self._units:  # stages as attributes: RegNet's s1..s4
            import re

            for attr, child in list(self.model.named_children()):
                if re.fullmatch(r"(s|stage|layer)\d+", attr) and any(True for _ in child.parameters()):
                    setattr(self.model, attr, CheckpointUnit(child))
                    self._units.append(getattr(self.model, attr))
        # no stage list at all: the whole model is the FSDP2 root, without checkpointing units
        self.pruned = _prune_unused(self.model, kwargs.get("img_size"))
        info = getattr(self.model, "feature_info", None) or [{}]
        self.patch_size = int(info[-1].get("reduction", 32))
        self.embed_dim = int(self.model.num_features)
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0) or 0)
        self.summary_pool = SummaryPool(self.embed_dim, self.summary_teachers)
        self._match_norm_stats_dtype()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[2] // self.patch_size, images.shape[3] // self.patch_size
        out = self.model.forward_features(images)
        if out.dim() == 3:  # tokens [B, prefix + h*w, D]
            out = out[:, self.num_prefix_tokens:].transpose(1, 2).reshape(out.shape[0], -1, h, w)
        elif out.dim() == 4 and out.shape[-1] == self.embed_dim and out.shape[1:3] == (h, w):
            out = out.permute(0, 3, 1, 2)  # channels-last models (Swin): [B, h, w, D]
        if out.shape[1] != self.embed_dim or out.shape[2:] != (h, w):
            raise ValueError(f"timm model '{self.timm_name}': features {list(out.shape)} are not "
                             f"[B, {self.embed_dim}, {h}, {w}] at input {list(images.shape[2:])}")
        return out

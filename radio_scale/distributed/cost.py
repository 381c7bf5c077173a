"""Analytic cost model: forward FLOPs, parameter counts and per-rank memory of the student and the teachers.

Counting rules (the usual ones for transformer FLOP estimates, and what `torch.utils.flop_counter`
reports for the same modules): a multiply-accumulate is 2 FLOPs; linear layers, convolutions and the
two attention matmuls (QK^T and AV) are counted; norms, activations and softmax are not. Training the
student costs 3 forwards (forward + backward), 4 with activation checkpointing (the forward is
recomputed); teachers only run forward.

Memory model (bf16 on GPU, per rank, in bytes):
- student under FSDP2 (bf16 compute, fp32 master): fp32 params + fp32 grads + two fp32 AdamW moments =
  16 B/param sharded over the world, plus the unsharded working set: bf16 params and bf16/fp32 grads of
  FSDP_GATHERED_BLOCKS blocks (current + prefetched) and of the root module (patch embed, position grid,
  heads), which stays gathered through the step;
- student activations, calibrated against the saved-for-backward bytes this code keeps (measured with
  torch.autograd.graph.saved_tensors_hooks by tests/test_plan.py, at two widths, with and without windows and
  σReparam; the model is asserted within 10 %): per token, channel and block ACT_BYTES(r) = 16 + 4r bytes with
  global attention (32 for r = 4: block input, LN outputs, q/k/v, attention output, projection input, the two
  MLP tensors), plus WINDOW_COPY_BYTES (8) per *padded* token and channel in a windowed block (the windowed
  copies of q, k, v and the attention output, over the grid padded to a multiple of the window); the root
  keeps the patch-embedding input and output (3p^2 + d bf16 values per token). With activation checkpointing
  a block keeps only its bf16 input (2 B) and one block at a time is recomputed in full. The memory the plan
  reserves is the largest over the student's window sizes. σReparam saves each linear's bf16 effective weight
  for backward: 12 d^2 x 2 B per block kept (one block under checkpointing), independent of the batch;
- teachers: bf16 params, full if replicated; if FSDP-sharded, the image encoder /group size + its gathered
  blocks, and the parts the forward never runs (CLIP's text tower, SAM's decoder) in full; no-grad forward
  keeps one block's transient tensors (TEACHER_ACT_BYTES(r) = 12 + 4r B per token per channel), plus the
  N x N attention matrices where the implementation materialises them (SAM's image encoder);
- adaptor heads and losses: per teacher of the group, bf16 head activations at the student's tokens and
  fp32 predictions/targets at the larger of the two grids;
- RUNTIME_OVERHEAD_GB for the CUDA context, NCCL buffers and allocator fragmentation.

Communication of a sharded teacher: every forward all-gathers its image encoder once (one block at a time,
the next prefetched while the current one computes), so a rank receives BF16 x encoder params x (n-1)/n bytes
per step; at `hardware.interconnect_gbps` that takes teacher_comm_s, overlapped with the teacher's compute
(the teacher's time is the larger of the two).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

from radio_scale.config.schema import RunConfig, StudentConfig, TeacherConfig
from radio_scale.models.presets import STUDENT_PRESETS

GB = 1024**3
BF16 = 2
FP32 = 4
ADAM_BYTES_PER_PARAM = 16  # fp32 param + fp32 grad + exp_avg + exp_avg_sq
FSDP_GATHERED_BLOCKS = 2  # the block being computed and the one prefetched
RUNTIME_OVERHEAD_GB = 3.0
STUDENT_TRAIN_FORWARDS = 3  # forward + backward (backward = 2 forwards)
RECOMPUTE_FORWARDS = 1  # activation checkpointing reruns the forward once during backward
DEFAULT_INTERCONNECT_GBPS = 50.0  # GB/s one rank all-gathers at (InfiniBand NDR 400 Gb/s across nodes)


WINDOW_COPY_BYTES = 8.0  # windowed q, k, v and attention output (bf16), per padded token and channel


def act_bytes(mlp_ratio: float) -> float:
    """Bytes stored for backward per token per channel in one pre-norm ViT block of the student (bf16, fused
    global attention); measured 32.1 for r = 4 (tests/test_plan.py)."""
    # block in, LN1 out, Q/K/V, attention out, proj in, LN2 out: 2+2+6+2+2+2 = 16; fc1 out, GELU out: 2r+2r
    return 16.0 + 4.0 * mlp_ratio


def teacher_act_bytes(mlp_ratio: float) -> float:
    """Peak transient bytes per token per channel of one block in a no-grad forward (bf16)."""
    # residual in, LN out, QKV (3), attention out: 2+2+6+2 = 12; MLP hidden before/after activation: 4r
    return 12.0 + 4.0 * mlp_ratio


@dataclass(frozen=True)
class VisionArch:
    """Dimensions of a ViT-style encoder: enough to count its FLOPs, parameters and activation memory."""

    width: int
    depth: int
    patch_size: int
    num_heads: int
    mlp_hidden: int  # FFN hidden size (per branch for SwiGLU)
    image_size: int  # the model's own input side in px
    swiglu: bool = False
    prefix_tokens: int = 1  # CLS + registers
    window_size: int = 0  # ViTDet-style windowed attention in every non-global block; 0 = global everywhere
    global_blocks: tuple[int, ...] = ()
    rel_pos: bool = False  # SAM's decomposed relative position terms
    neck_dim: int = 0  # SAM's conv neck output channels (0: no neck)
    fused_attention: bool = True  # False: the N x N attention matrix is materialised (SAM)
    pos_grid: int = 0  # learned position grid side (0: one position per patch at image_size)
    out_dim: int = 0  # channels of the spatial features (0: width)
    summary_dim: int = 0  # channels of the summary vector (0: no summary)
    spectral: bool = False  # σReparam linears (the student's spectral_reparam)

    @property
    def mlp_ratio(self) -> float:
        return self.mlp_hidden / self.width

    @property
    def block_params(self) -> int:
        """Parameters of one transformer block."""
        d, h = self.width, self.mlp_hidden
        attn = 4 * d * d + 4 * d
        mlp = (2 * d * h + 2 * h + h * d + d) if self.swiglu else (2 * d * h + h + d)
        rel = 2 * (2 * self.image_size // self.patch_size - 1) * (d // self.num_heads) if self.rel_pos else 0
        return attn + mlp + 4 * d + rel

    @property
    def params(self) -> int:
        """All parameters (patch embed, positions, prefix tokens, blocks, final norm, neck)."""
        d, p = self.width, self.patch_size
        grid = self.pos_grid or self.image_size // p
        root = 3 * p * p * d + d + grid * grid * d + self.prefix_tokens * d + 2 * d
        neck = d * self.neck_dim + 9 * self.neck_dim**2 + 4 * self.neck_dim if self.neck_dim else 0
        return root + self.depth * self.block_params + neck

    def tokens(self, image_size: int) -> int:
        """Token count (patches + prefix) for a square input."""
        g = image_size // self.patch_size
        return g * g + self.prefix_tokens

    def forward_flops(self, image_size: int, window_size: Optional[int] = None) -> float:
        """Forward FLOPs of one square image; window_size overrides the arch's (0 = global attention)."""
        d, p = self.width, self.patch_size
        w = self.window_size if window_size is None else window_size
        g = image_size // p
        n, pre = g * g, self.prefix_tokens
        flops = 2.0 * n * 3 * p * p * d  # patch embedding
        mlp_macs = (3 if self.swiglu else 2) * d * self.mlp_hidden
        for i in range(self.depth):
            if w and i not in self.global_blocks:
                # ViTDet/SAM: pad the grid to a multiple of the window; qkv/proj see the padded tokens
                gp = math.ceil(g / w) * w
                n_attn, keys, side = gp * gp, w * w, w
                pre_keys = n + pre  # prefix tokens keep attending globally
            else:
                n_attn, keys, side = n, n + pre, g
                pre_keys = n + pre
            flops += 2.0 * 4 * d * d * (n_attn + pre)  # qkv + output projection
            flops += 2.0 * 2 * d * (n_attn * keys + pre * pre_keys)  # QK^T and AV
            if self.rel_pos:
                flops += 2.0 * n_attn * 2 * side * d  # q . R_h and q . R_w
            flops += 2.0 * mlp_macs * (n + pre)
        if self.neck_dim:
            flops += 2.0 * n * (d * self.neck_dim + 9 * self.neck_dim * self.neck_dim)
        return flops

    def train_activation_bytes(self, image_size: int, checkpointing: bool, window_size: int = 0) -> float:
        """Activation bytes one image keeps for backward (bf16, fused attention) at this window size."""
        d, g = self.width, image_size // self.patch_size
        n = self.tokens(image_size)
        glob = act_bytes(self.mlp_ratio) * n * d
        if window_size and not (window_size >= g):
            padded = (math.ceil(g / window_size) * window_size) ** 2
            win = glob + WINDOW_COPY_BYTES * padded * d
        else:
            win = glob
        n_global = sum(1 for i in range(self.depth) if i in set(self.global_blocks))
        root = BF16 * n * (3 * self.patch_size**2 + d)  # patch-embedding input and output
        if not checkpointing:
            return root + n_global * glob + (self.depth - n_global) * win
        return root + self.depth * BF16 * n * d + max(glob, win)

    def spectral_bytes(self, checkpointing: bool) -> float:
        """σReparam's saved bf16 effective weights (per step, not per image): every block's, or one recomputed
        block's under activation checkpointing."""
        if not self.spectral:
            return 0.0
        per_block = BF16 * (4 * self.width * self.width + (3 if self.swiglu else 2) * self.width * self.mlp_hidden)
        return per_block * (1 if checkpointing else self.depth)

    def forward_working_bytes(self, image_size: int) -> float:
        """Peak transient bytes of one image in a no-grad forward (one block alive at a time)."""
        n = self.tokens(image_size)
        peak = teacher_act_bytes(self.mlp_ratio) * n * self.width
        if not self.fused_attention:
            g = image_size // self.patch_size
            glob = (g * g) ** 2 if (not self.window_size or self.global_blocks) else 0
            win = (math.ceil(g / self.window_size) * self.window_size) ** 2 * self.window_size**2 if self.window_size else 0
            # scores, scores + position terms, softmax: three N x N tensors per head
            peak += 3 * BF16 * self.num_heads * max(glob, win)
        return peak


@dataclass(frozen=True)
class ConvNetCost:
    """A CNN teacher placeholder: measured size and FLOPs at 224 px, scaled with the input area."""

    params: int
    gflops_224: float
    peak_act_elems_224: int  # largest single activation of one image at 224 px
    out_dim: int
    stride: int = 32
    image_size: int = 224


@dataclass(frozen=True)
class TeacherCost:
    """What the planner needs to know about one teacher at its input size (per image)."""

    name: str
    input_size: int
    params: int
    forward_flops: float
    working_bytes: float  # peak transient bytes of a no-grad forward
    out_tokens: int  # spatial positions of its feature map
    embed_dim: int
    summary_dim: int
    has_summary: bool
    gathered_params: int  # parameters FSDP holds unsharded at once (blocks in flight + root)
    source: str  # where the numbers come from: table, teacher_spec, open_clip config, timm meta
    encoder_params: int = 0  # the image encoder's parameters (what FSDP shards and gathers); 0: all of params

    @property
    def sharded_params(self) -> int:
        """Parameters FSDP shards over the group (the image encoder); the rest stays whole on every rank."""
        return min(self.encoder_params or self.params, self.params)


def teacher_comm_bytes(teacher: TeacherCost, group_size: int) -> float:
    """Bytes one rank receives per forward of an FSDP-sharded teacher (all-gather of its encoder, bf16)."""
    if group_size <= 1:
        return 0.0
    return BF16 * teacher.sharded_params * (group_size - 1) / group_size


def _clip(width, depth, patch, heads, image, proj) -> VisionArch:
    return VisionArch(width, depth, patch, heads, 4 * width, image, out_dim=width, summary_dim=proj)


def _dinov2(width, depth, heads, registers, swiglu=False) -> VisionArch:
    # timm's DINOv2 giant uses a packed SwiGLU of hidden 8192 = two branches of 4096
    hidden = 4096 if swiglu else 4 * width
    return VisionArch(width, depth, 14, heads, hidden, 518, swiglu=swiglu, prefix_tokens=1 + registers,
                      out_dim=width, summary_dim=width)


def _sam(width, depth, heads, global_blocks) -> VisionArch:
    return VisionArch(width, depth, 16, heads, 4 * width, 1024, prefix_tokens=0, window_size=14,
                      global_blocks=global_blocks, rel_pos=True, neck_dim=256, fused_attention=False,
                      out_dim=256, summary_dim=0)


# Known teacher architectures, (family, model name) -> dimensions, read from each library's own definition:
# open_clip model configs (vision_cfg), timm's DINOv2 entries, segment_anything's build_sam_vit_{b,l,h}.
KNOWN_TEACHERS: dict[tuple[str, str], VisionArch] = {
    ("open_clip", "ViT-H-14-378-quickgelu"): _clip(1280, 32, 14, 16, 378, 1024),
    ("open_clip", "ViT-H-14-378"): _clip(1280, 32, 14, 16, 378, 1024),
    ("open_clip", "ViT-H-14-quickgelu"): _clip(1280, 32, 14, 16, 224, 1024),
    ("open_clip", "ViT-H-14"): _clip(1280, 32, 14, 16, 224, 1024),
    ("open_clip", "ViT-L-14-336-quickgelu"): _clip(1024, 24, 14, 16, 336, 768),
    ("open_clip", "ViT-L-14-336"): _clip(1024, 24, 14, 16, 336, 768),
    ("open_clip", "ViT-L-14-quickgelu"): _clip(1024, 24, 14, 16, 224, 768),
    ("open_clip", "ViT-L-14"): _clip(1024, 24, 14, 16, 224, 768),
    ("open_clip", "ViT-B-16"): _clip(768, 12, 16, 12, 224, 512),
    ("open_clip", "ViT-B-16-quickgelu"): _clip(768, 12, 16, 12, 224, 512),
    ("open_clip", "ViT-bigG-14"): VisionArch(1664, 48, 14, 16, 8192, 224, out_dim=1664, summary_dim=1280),
    ("dinov2", "vit_giant_patch14_dinov2"): _dinov2(1536, 40, 24, 0, swiglu=True),
    ("dinov2", "vit_giant_patch14_reg4_dinov2"): _dinov2(1536, 40, 24, 4, swiglu=True),
    ("dinov2", "vit_large_patch14_dinov2"): _dinov2(1024, 24, 16, 0),
    ("dinov2", "vit_large_patch14_reg4_dinov2"): _dinov2(1024, 24, 16, 4),
    ("dinov2", "vit_base_patch14_dinov2"): _dinov2(768, 12, 12, 0),
    ("dinov2", "vit_base_patch14_reg4_dinov2"): _dinov2(768, 12, 12, 4),
    ("dinov2", "vit_small_patch14_dinov2"): _dinov2(384, 12, 6, 0),
    ("dinov2", "vit_small_patch14_reg4_dinov2"): _dinov2(384, 12, 6, 4),
    ("sam", "vit_h"): _sam(1280, 32, 16, (7, 15, 23, 31)),
    ("sam", "vit_l"): _sam(1024, 24, 16, (5, 11, 17, 23)),
    ("sam", "vit_b"): _sam(768, 12, 12, (2, 5, 8, 11)),
}

# CNN placeholders (measured with timm on the meta device: parameters, FLOPs and largest activation at 224 px).
KNOWN_CONVNETS: dict[tuple[str, str], ConvNetCost] = {
    ("timm", "tf_efficientnet_lite0"): ConvNetCost(4_652_008, 0.768, 1_204_224, 1280),
    ("timm", "efficientnet_lite0"): ConvNetCost(4_652_008, 0.768, 1_204_224, 1280),
    ("timm", "tf_efficientnet_lite1"): ConvNetCost(5_416_680, 1.005, 1_204_224, 1280),
    ("timm", "tf_efficientnet_lite2"): ConvNetCost(6_092_072, 1.153, 1_204_224, 1280),
    ("timm", "resnet50"): ConvNetCost(25_557_032, 8.174, 802_816, 2048),
}


def tiny_arch(base: VisionArch) -> VisionArch:
    """Placeholder dimensions of a family's tiny test variant (model_kwargs {tiny: true})."""
    neck = min(base.neck_dim, 32)
    return replace(base, width=64, depth=2, num_heads=2, mlp_hidden=256, swiglu=False,
                   window_size=min(base.window_size, 4), global_blocks=(1,) if base.global_blocks else (),
                   neck_dim=neck, out_dim=neck or 64, summary_dim=64 if base.summary_dim else 0,
                   prefix_tokens=min(base.prefix_tokens, 1))


def _open_clip_arch(model: str) -> Optional[VisionArch]:
    """An open_clip model not in the table: read its shipped config (no weights involved)."""
    try:
        import open_clip
    except ImportError:
        return None
    mc = open_clip.get_model_config(model)
    if not mc or "vision_cfg" not in mc:
        return None
    vc = mc["vision_cfg"]
    if not isinstance(vc.get("layers"), int) or "patch_size" not in vc:
        return None  # a CNN tower (ResNet/ConvNeXt): handled as an unknown model
    width = vc.get("width", 768)
    head_width = vc.get("head_width", 64)
    return VisionArch(width, vc["layers"], vc["patch_size"], max(1, width // head_width),
                      int(width * vc.get("mlp_ratio", 4.0)), vc.get("image_size", 224),
                      out_dim=width, summary_dim=mc.get("embed_dim", width))


def _timm_meta_cost(tc: TeacherConfig, input_size: Optional[int]) -> TeacherCost:
    """Any timm model: build it on the meta device (no memory, no weights) and count with torch's FLOP counter."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    kwargs = {k: v for k, v in tc.model_kwargs.items() if k != "tiny"}
    with torch.device("meta"):
        model = timm.create_model(tc.model, pretrained=False, **kwargs)
    size = input_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    params = sum(p.numel() for p in model.parameters())
    peak = [0]

    def largest(_mod, _inp, out):
        if isinstance(out, torch.Tensor):
            peak[0] = max(peak[0], out.numel())

    hooks = [m.register_forward_hook(largest) for m in model.modules()]
    try:
        with torch.device("meta"), torch.no_grad(), FlopCounterMode(display=False) as counter:
            feats = model.forward_features(torch.empty(1, 3, size, size))
        flops, source = float(counter.get_total_flops()), "timm meta"
        out_tokens = int(feats.shape[-1] * feats.shape[-2]) if feats.ndim == 4 else int(feats.shape[1])
    except Exception:  # a model whose forward needs real data: fall back to a rough size-based guess
        flops, source = 2.0 * params * 2.5 * (size / 32) ** 2, "timm params (rough)"
        out_tokens, peak[0] = (size // 32) ** 2, params
    finally:
        for h in hooks:
            h.remove()
    dim = int(getattr(model, "num_features", 0) or 0)
    return TeacherCost(tc.name, size, params, flops, 3.0 * BF16 * peak[0], out_tokens, dim, dim, True,
                       params, source, params)


def _with_spec(tc: TeacherConfig, cost: TeacherCost) -> TeacherCost:
    """The teachers package's own numbers (FLOPs, parameters, dims) over the tables', where it provides them."""
    # ImportError is tolerated at this one place: the planner must keep working from the tables above on a
    # machine without the teachers' libraries (open_clip, timm, segment_anything), which the spec reads.
    try:
        from radio_scale.teachers.spec import teacher_spec

        spec = teacher_spec(tc)
    except ImportError:
        return cost
    grid = getattr(spec, "grid_size", None)
    return replace(cost, forward_flops=float(spec.forward_gflops) * 1e9, params=int(spec.params),
                   input_size=spec.input_size, embed_dim=spec.embed_dim, summary_dim=spec.summary_dim,
                   has_summary=spec.has_summary, out_tokens=grid[0] * grid[1] if grid else cost.out_tokens,
                   source="teacher_spec")


def teacher_cost(tc: TeacherConfig) -> TeacherCost:
    """Per-image cost of a configured teacher at its input size (its own size when input_size is unset)."""
    key = (tc.family, tc.model)
    tiny = bool(tc.model_kwargs.get("tiny"))
    arch = KNOWN_TEACHERS.get(key)
    if arch is None and tc.family == "open_clip":
        arch = _open_clip_arch(tc.model)
    if arch is not None:
        if tiny:
            arch = tiny_arch(arch)
        size = tc.input_size or arch.image_size
        cost = TeacherCost(
            tc.name, size, arch.params, arch.forward_flops(size), arch.forward_working_bytes(size),
            (size // arch.patch_size) ** 2, arch.out_dim or arch.width, arch.summary_dim, arch.summary_dim > 0,
            FSDP_GATHERED_BLOCKS * arch.block_params + (arch.params - arch.depth * arch.block_params),
            "table" if key in KNOWN_TEACHERS else "open_clip config", arch.params,
        )
    elif key in KNOWN_CONVNETS and not tc.model_kwargs:
        cnn = KNOWN_CONVNETS[key]
        size = tc.input_size or cnn.image_size
        area = (size / 224) ** 2
        cost = TeacherCost(tc.name, size, cnn.params, cnn.gflops_224 * 1e9 * area,
                           3.0 * BF16 * cnn.peak_act_elems_224 * area, (size // cnn.stride) ** 2,
                           cnn.out_dim, cnn.out_dim, True, cnn.params, "table", cnn.params)
    elif tc.family in ("timm", "dinov2"):
        cost = _timm_meta_cost(tc, tc.input_size)
    else:
        raise ValueError(f"teacher '{tc.name}': no cost model for {tc.family} model '{tc.model}'")
    return _with_spec(tc, cost)


def student_arch(student: StudentConfig, prefix_tokens: int) -> VisionArch:
    """The student's dimensions: its preset with the config's overrides; prefix = summary tokens + registers."""
    if student.arch not in STUDENT_PRESETS:
        raise ValueError(f"student.arch '{student.arch}' is not a known preset ({', '.join(STUDENT_PRESETS)})")
    pre = STUDENT_PRESETS[student.arch]
    width = student.embed_dim or pre.embed_dim
    return VisionArch(
        width=width,
        depth=student.depth or pre.depth,
        patch_size=student.patch_size or pre.patch_size,
        num_heads=student.num_heads or pre.num_heads,
        mlp_hidden=int(width * pre.mlp_ratio),
        image_size=student.cpe_grid * (student.patch_size or pre.patch_size),
        prefix_tokens=prefix_tokens + student.num_registers,
        global_blocks=tuple(student.global_blocks),
        pos_grid=student.cpe_grid,
        spectral=student.spectral_reparam,
    )


@dataclass(frozen=True)
class StudentCost:
    """The student with every adaptor head: parameters and per-image costs at any resolution and window."""

    arch: VisionArch
    head_params: int
    config: Optional[StudentConfig] = None  # a ViT preset student: its FLOPs come from models/flops.py
    num_summary: int = 0

    @property
    def params(self) -> int:
        return self.arch.params + self.head_params

    @property
    def root_params(self) -> int:
        """Parameters outside the blocks (FSDP keeps them gathered for the whole step)."""
        return self.params - self.arch.depth * self.arch.block_params

    def forward_flops(self, resolution: int, window_size: int) -> float:
        """Forward FLOPs of one image: the one student FLOP model (radio_scale.models.flops, checked against
        FlopCounterMode), which pads windows after qkv as the student does; VisionArch.forward_flops pads before
        qkv, as SAM's teacher encoder does."""
        if self.config is not None:
            from radio_scale.models.flops import student_forward_flops

            return student_forward_flops(self.config, resolution, window_size, self.num_summary)
        return self.arch.forward_flops(resolution, window_size)

    def activation_bytes(self, resolution: int, checkpointing: bool, windows: tuple[int, ...]) -> float:
        """Per-image activation bytes the plan reserves: the largest over the step's possible window sizes."""
        return max(self.arch.train_activation_bytes(resolution, checkpointing, w) for w in windows)

    def spectral_bytes(self, checkpointing: bool) -> float:
        fn = getattr(self.arch, "spectral_bytes", None)
        return fn(checkpointing) if fn else 0.0

    def state_bytes(self, world_size: int, zero_stage: int = 3) -> float:
        """Sharded fp32 params/grads/AdamW moments plus the gathered bf16 working set on one rank.

        zero_stage (DeepSpeed; FSDP2 is 3): 1 keeps bf16 params and grads whole on every rank and shards the fp32
        master weights and moments (4 + 12/n B per parameter); 2 also shards the grads (2 + 14/n)."""
        if zero_stage in (1, 2):
            whole = BF16 * (2 if zero_stage == 1 else 1)
            return self.params * (whole + (ADAM_BYTES_PER_PARAM - whole) / world_size)
        sharded = ADAM_BYTES_PER_PARAM * self.params / world_size
        # gathered bf16 params + bf16 grads + fp32 grads for the reduce-scatter
        gathered = (BF16 + BF16 + FP32) * (FSDP_GATHERED_BLOCKS * self.arch.block_params + self.root_params)
        return sharded + (gathered if world_size > 1 else 0.0)


class BackboneArch:
    """A non-ViT student (E-RADIO, timm:<name>) seen through VisionArch's interface, from the student's own figures
    (radio_scale.models.registry.student_figures: FLOPs and saved-activation bytes measured on the meta device,
    per resolution). The FSDP2 wrap units play the blocks: depth = their count, block_params = the largest."""

    def __init__(self, student: StudentConfig, num_summary: int):
        from radio_scale.models.registry import student_figures

        self._student, self._num_summary, self._figures = student, num_summary, {}
        self._measure = student_figures
        base = self.figures(224 if student.arch.startswith("timm:") else 256)
        self.width, self.patch_size = base.width, base.stride
        self.params = base.params
        self.unit_params = base.unit_params
        self.depth = len(base.unit_params)
        self.block_params = max(base.unit_params, default=0)
        self.mlp_ratio = 4.0

    def figures(self, resolution: int):
        if resolution not in self._figures:
            self._figures[resolution] = self._measure(self._student, self._num_summary, resolution)
        return self._figures[resolution]

    def tokens(self, image_size: int) -> int:
        g = image_size // self.patch_size
        return g * g

    def forward_flops(self, image_size: int, window_size: Optional[int] = None) -> float:
        return self.figures(image_size).forward_flops

    def train_activation_bytes(self, image_size: int, checkpointing: bool, window_size: int = 0) -> float:
        f = self.figures(image_size)
        return f.act_bytes_ckpt if checkpointing else f.act_bytes


@dataclass(frozen=True)
class BackboneStudentCost(StudentCost):
    """StudentCost of a non-ViT student: the root is everything outside its wrap units."""

    @property
    def root_params(self) -> int:
        return self.params - sum(self.arch.unit_params)


def student_cost(cfg: RunConfig) -> StudentCost:
    """The student of a run: one summary token and one summary head per summary teacher, one spatial head each."""
    teachers = [teacher_cost(t) for t in cfg.teachers]
    if cfg.student.arch not in STUDENT_PRESETS:  # E-RADIO, timm:<name>: the student's own figures
        arch = BackboneArch(cfg.student, sum(t.has_summary for t in teachers))
        d = arch.width
        heads = sum((d * d + d * t.summary_dim if t.has_summary else 0) + d * d + d * t.embed_dim for t in teachers)
        return BackboneStudentCost(arch, heads)
    n_summary = sum(t.has_summary for t in teachers)
    arch = student_arch(cfg.student, n_summary)
    d = arch.width
    # every head is a 2-layer MLP with the student's width as hidden size
    heads = sum((d * d + d * t.summary_dim if t.has_summary else 0) + d * d + d * t.embed_dim for t in teachers)
    return StudentCost(arch, heads, cfg.student, n_summary)


def head_loss_bytes(student: VisionArch, resolution: int, teacher: TeacherCost) -> float:
    """Per-image bytes of one teacher's adaptor head activations and loss tensors."""
    n = student.tokens(resolution)
    c = teacher.embed_dim
    head = BF16 * n * (3 * student.width + c)  # input, hidden before/after GELU, output (bf16)
    loss = 2 * FP32 * c * max(n, teacher.out_tokens)  # fp32 prediction + target on the larger grid
    return head + loss

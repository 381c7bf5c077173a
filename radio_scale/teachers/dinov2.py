"""DINOv2 teachers through timm: `vit_{small,base,large,giant}_patch14_dinov2` and their `_reg4_` variants.

Summary = the CLS token and spatial = the patch tokens of `forward_features`, i.e. after the model's final
norm, with the register tokens left out (`model.num_prefix_tokens`). Neither is L2-normalised: the spatial
loss has a smooth-L1 term, so the student must match magnitudes as well as directions.

Checkpoints: a timm state dict (e.g. the hub's model.safetensors) or the original DINOv2 .pth; timm's own
`checkpoint_filter_fn` converts the latter and resamples the position embedding to the configured input size
(DINOv2 is trained at 518 px; the paper runs it at 224).
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config
from timm.models.vision_transformer import checkpoint_filter_fn

from radio_scale.config.schema import TeacherConfig
from radio_scale.teachers.base import Teacher, TeacherOutput, constructing, tokens_to_grid
from radio_scale.teachers.checkpoints import load_error, load_strict, one_line, read_checkpoint
from radio_scale.teachers.spec import (
    TeacherSpec, check_multiple, forward_flops, normalisation, param_count, split_kwargs, teacher_spec,
)

EXPECTED = "a timm or original DINOv2 state dict: .safetensors, or .pth/.bin (weights-only)"
DEFAULT_INPUT_SIZE = 224
# Size overrides -> timm ViT constructor arguments.
SIZE_KEYS = {"width": "embed_dim", "depth": "depth", "heads": "num_heads"}
TINY = {"width": 64, "depth": 2, "heads": 2, "input_size": 56}


def _input_size(tc: TeacherConfig) -> int:
    return tc.input_size or (TINY["input_size"] if tc.model_kwargs.get("tiny") else DEFAULT_INPUT_SIZE)


def _create(tc: TeacherConfig) -> torch.nn.Module:
    """The timm DINOv2 ViT at the input size, without its classifier (nothing downloaded)."""
    opts, library = split_kwargs(tc, tuple(SIZE_KEYS))
    size = {**(TINY if opts.get("tiny") else {}), **{k: v for k, v in opts.items() if k in SIZE_KEYS}}
    kwargs = {SIZE_KEYS[k]: v for k, v in size.items() if k in SIZE_KEYS}
    kwargs.update(library)
    try:
        model = timm.create_model(tc.model, pretrained=False, img_size=_input_size(tc), num_classes=0, **kwargs)
    except Exception as e:
        raise ValueError(f"teacher '{tc.name}': timm cannot build '{tc.model}' with {sorted(kwargs)} "
                         f"({type(e).__name__}: {one_line(e, 160)})") from None
    if getattr(model, "cls_token", None) is None or not hasattr(model, "patch_embed"):
        raise ValueError(f"teacher '{tc.name}': timm model '{tc.model}' is not a ViT with a CLS token "
                         "(family dinov2 expects vit_*_patch14_dinov2)")
    return model


def spec(tc: TeacherConfig) -> TeacherSpec:
    """Spec of a DINOv2 teacher: timm's entrypoint instantiated on the meta device (no memory, no weights)."""
    input_size = _input_size(tc)
    with torch.device("meta"):
        model = _create(tc)
    patch = model.patch_embed.patch_size[0]
    check_multiple(tc, input_size, patch)
    width = model.embed_dim
    mlp = model.blocks[0].mlp
    # MLP MACs per token over D² (4 for the usual 4x MLP and for giant's packed SwiGLU 2x4096: 8192 + 4096 = 8·1536)
    mlp_macs = mlp.fc1.in_features * mlp.fc1.out_features + mlp.fc2.in_features * mlp.fc2.out_features
    mlp_ratio = mlp_macs / (2 * width**2)
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    data = resolve_data_config({}, model=model)
    mean, std = normalisation(tc, data["mean"], data["std"])
    gflops = forward_flops(width, len(model.blocks), grid, patch, prefix_tokens=model.num_prefix_tokens,
                           mlp_ratio=mlp_ratio) / 1e9
    return TeacherSpec(
        name=tc.name, family=tc.family, model=tc.model, input_size=input_size, patch_size=patch, grid_size=grid,
        embed_dim=width, summary_dim=width, has_summary=True, mean=mean, std=std, resize_mode="squash",
        params=param_count(model), forward_gflops=gflops,
    )


def _load(tc: TeacherConfig, model: torch.nn.Module, path: Path, state: dict) -> None:
    """Local weights (timm or original DINOv2 layout), converted by timm's filter, loaded strictly."""
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception as e:
        raise load_error(tc.name, path, f"timm cannot convert it for '{tc.model}' ({type(e).__name__}: "
                         f"{one_line(e, 120)})", EXPECTED) from None
    load_strict(tc.name, path, model, state, f"timm '{tc.model}'", EXPECTED)


class Dinov2Teacher(Teacher):
    """A timm DINOv2 ViT as a teacher."""

    def __init__(self, spec: TeacherSpec, model: torch.nn.Module):
        super().__init__()
        self.adopt_spec(spec)
        self.model = model

    def forward(self, images: torch.Tensor) -> TeacherOutput:
        """summary = post-norm CLS [B, D]; spatial = post-norm patch tokens, registers excluded [B, D, h, w]."""
        feats = self.model.forward_features(self.check_input(images))
        tokens = feats[:, self.model.num_prefix_tokens:]
        return TeacherOutput(feats[:, 0].float(), tokens_to_grid(tokens, self.grid_size).float())


def build(tc: TeacherConfig, device: torch.device) -> Dinov2Teacher:
    """The DINOv2 teacher: seeded random init, then the local checkpoint unless random_init."""
    s = teacher_spec(tc)
    weights = None if tc.random_init else read_checkpoint(tc, EXPECTED)  # fail before building
    with constructing(tc.init_seed, tc.random_init, device):
        model = _create(tc)
    if weights is not None:
        _load(tc, model, *weights)
    return Dinov2Teacher(s, model)

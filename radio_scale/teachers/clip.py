"""open_clip teachers (OpenAI CLIP, OpenCLIP, DFN, MetaCLIP, SigLIP, ...), any open_clip model name.

Summary = the image embedding exactly as `model.encode_image(x)` returns it: pooled, projected into the
text tower's space, not normalised — so zero-shot with this teacher's text tower (`encode_text`, `tokenizer`)
works on the student's summary head for it. Spatial = the final patch tokens *without* the projection:
for open_clip's VisionTransformer they are the tokens the tower returns with `output_tokens=True`, i.e.
after ln_post (before it for the rare `final_ln_after_pool` configs) (embed_dim = vision width;
summary_dim = projection dim). The projection is left out because it is trained
for the pooled token only, and the paper matches the backbone's patch features.

timm-based towers (SigLIP, ConvNeXt, EVA, ...) return no tokens through open_clip: there the spatial output is
the timm trunk's `forward_features` (post-norm patch tokens without prefix tokens, or the last NCHW map) and
the summary is trunk head + open_clip head, i.e. again exactly `encode_image`. Their HuggingFace tokenizers
need the hub, so `tokenizer` only works where that tokenizer is cached.

ResNet towers (RN50, ...) and attentional-pool towers (CoCa) have no patch-token output and are refused.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import open_clip
import timm
import torch
from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

from radio_scale.config.schema import TeacherConfig
from radio_scale.teachers.base import Teacher, TeacherOutput, constructing, tokens_to_grid
from radio_scale.teachers.checkpoints import load_error, one_line, resolve_checkpoint
from radio_scale.teachers.spec import (
    TeacherSpec, check_multiple, counted_forward_flops, forward_flops, normalisation, param_count, split_kwargs,
    teacher_spec,
)

EXPECTED = "an open_clip state dict: .bin/.pth/.pt (weights-only) or .safetensors, e.g. open_clip_pytorch_model.bin"
# Size overrides (tiny variants, or any model): vision tower, projection, text tower.
SIZE_KEYS = ("width", "layers", "heads", "patch_size", "embed_dim", "text_width", "text_layers", "text_heads",
             "timm_model_name")
# The tiny variant: a 2-block ViT at 64 px with a 1-block text tower that still takes the real tokenizer's ids;
# timm towers swap their trunk for timm's own tiny test ViT (attention-pool head, like SigLIP's).
TINY = {"input_size": 64, "width": 64, "layers": 2, "heads": 2, "patch_size": 8, "embed_dim": 32,
        "text_width": 32, "text_layers": 1, "text_heads": 2, "timm_model_name": "test_vit3"}


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence open_clip's 'no pretrained weights loaded' warning: weights are loaded right after, from a file."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


@lru_cache(maxsize=None)
def _timm_width(name: str) -> int:
    """Feature width of a timm model, read off a meta-device instance."""
    with torch.device("meta"):
        return int(timm.create_model(name, pretrained=False, num_classes=0).num_features)


def _resolve(tc: TeacherConfig) -> tuple[dict, int, bool]:
    """(create_model kwargs, input size, timm tower?) for a configured open_clip teacher."""
    cfg = open_clip.get_model_config(tc.model)
    if cfg is None:
        raise ValueError(f"teacher '{tc.name}': unknown open_clip model '{tc.model}' (see open_clip.list_models())")
    opts, library = split_kwargs(tc, SIZE_KEYS)
    size = {**(TINY if opts.get("tiny") else {}), **{k: v for k, v in opts.items() if k in SIZE_KEYS}}
    vision, text = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
    timm_tower = bool(vision.get("timm_model_name"))
    if not timm_tower and not isinstance(vision.get("layers"), int):
        raise ValueError(f"teacher '{tc.name}': open_clip model '{tc.model}' has a ResNet vision tower, "
                         "which returns no patch tokens (use a ViT or timm tower)")
    if vision.get("attentional_pool") or vision.get("pool_type", "tok") not in ("tok", "avg"):
        raise ValueError(f"teacher '{tc.name}': open_clip model '{tc.model}' pools with "
                         f"'{vision.get('pool_type', 'attentional')}', which returns no patch tokens")
    kwargs: dict = {}
    if timm_tower and "timm_model_name" in size:
        vision["timm_model_name"] = size["timm_model_name"]
        if vision.get("timm_proj") == "none" and "embed_dim" not in opts:
            # without a projection the image embedding is the trunk's width: the text tower must project to it
            size["embed_dim"] = _timm_width(vision["timm_model_name"])
    if not timm_tower:
        for key in ("width", "layers", "patch_size"):
            if key in size:
                vision[key] = size[key]
        if "heads" in size:  # open_clip derives heads as width // head_width
            vision["head_width"] = vision.get("width", 768) // size["heads"]
    for key, ours in (("width", "text_width"), ("layers", "text_layers"), ("heads", "text_heads")):
        if ours in size:
            text[key] = size[ours]
    native = vision.get("image_size", 224)
    native = native if isinstance(native, int) else native[0]
    input_size = tc.input_size or size.get("input_size") or native
    if not timm_tower:  # timm towers are resized after loading instead (see _set_timm_size)
        check_multiple(tc, input_size, vision.get("patch_size", 16))
        vision["image_size"] = input_size
    if "embed_dim" in size:
        kwargs["embed_dim"] = size["embed_dim"]
    if vision != cfg["vision_cfg"] or text != cfg["text_cfg"]:
        kwargs.update(vision_cfg=vision, text_cfg=text)
    return {**kwargs, **library}, input_size, timm_tower


def _create(tc: TeacherConfig, device: str) -> tuple[torch.nn.Module, int, bool]:
    """The open_clip model (no weights loaded, nothing downloaded), its input size, and whether its tower is timm."""
    kwargs, input_size, timm_tower = _resolve(tc)
    try:
        with _quiet():
            model = open_clip.create_model(tc.model, pretrained=None, device=device, pretrained_image=False,
                                           pretrained_text=False, **kwargs)
    except Exception as e:
        raise ValueError(f"teacher '{tc.name}': open_clip cannot build '{tc.model}' with {sorted(kwargs)} "
                         f"({type(e).__name__}: {one_line(e, 160)})") from None
    return model, input_size, timm_tower


def _set_timm_size(model: torch.nn.Module, input_size: int) -> None:
    """Resize a timm tower to the input size (after loading, so timm resamples the loaded position embedding)."""
    trunk = model.visual.trunk
    current = getattr(getattr(trunk, "patch_embed", None), "img_size", None)
    if current is not None and tuple(current) != (input_size, input_size):
        model.visual.set_input_size(input_size)


def _library_mean_std(tc: TeacherConfig, visual: torch.nn.Module) -> tuple[tuple, tuple]:
    """mean/std from open_clip_config.json beside the checkpoint, else from the model's pretrained tags if
    they agree, else open_clip's default."""
    if tc.checkpoint and not tc.checkpoint.startswith("pkg:"):
        cfg_file = Path(tc.checkpoint).expanduser().parent / "open_clip_config.json"
        if cfg_file.is_file():
            try:
                pp = json.loads(cfg_file.read_text()).get("preprocess_cfg", {})
            except (OSError, ValueError):
                pp = {}
            if "mean" in pp and "std" in pp:
                return tuple(pp["mean"]), tuple(pp["std"])
    default = visual.preprocess_cfg
    pairs = set()
    for tag in list_pretrained_tags_by_model(tc.model):
        c = get_pretrained_cfg(tc.model, tag)
        pairs.add((tuple(c.get("mean", default["mean"])), tuple(c.get("std", default["std"]))))
    if len(pairs) == 1:
        return pairs.pop()
    return tuple(default["mean"]), tuple(default["std"])


def _describe(tc: TeacherConfig, model: torch.nn.Module, input_size: int, timm_tower: bool) -> TeacherSpec:
    """Spec fields read off an (ideally meta-device) open_clip model."""
    visual = model.visual
    x = torch.empty(1, 3, input_size, input_size, device=next(visual.parameters()).device)
    if timm_tower:
        feats = visual.trunk.forward_features(x)
        if feats.ndim == 4:
            embed_dim, grid = feats.shape[1], tuple(feats.shape[-2:])
        else:
            embed_dim, grid = feats.shape[-1], tuple(visual.trunk.patch_embed.grid_size)
        summary_dim = visual(x).shape[-1]
        gflops = counted_forward_flops(visual, x) / 1e9
    else:
        width = visual.transformer.width
        summary_dim = visual.output_dim if visual.proj is not None else width
        grid = tuple(visual.grid_size)
        embed_dim = width
        mlp_ratio = visual.transformer.resblocks[0].mlp.c_fc.out_features / width
        proj = 2.0 * width * visual.output_dim if visual.proj is not None else 0.0
        gflops = forward_flops(width, visual.transformer.layers, grid, visual.patch_size[0], prefix_tokens=1,
                               mlp_ratio=mlp_ratio, extra_flops=proj) / 1e9
    mean, std = normalisation(tc, *_library_mean_std(tc, visual))
    return TeacherSpec(
        name=tc.name, family=tc.family, model=tc.model, input_size=input_size,
        patch_size=input_size // grid[0], grid_size=(int(grid[0]), int(grid[1])), embed_dim=int(embed_dim),
        summary_dim=int(summary_dim), has_summary=True, mean=mean, std=std, resize_mode="squash",
        params=param_count(model), forward_gflops=gflops,
    )


def spec(tc: TeacherConfig) -> TeacherSpec:
    """Spec of an open_clip teacher from its model config, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model, input_size, timm_tower = _create(tc, "meta")
        model.requires_grad_(False)
        if timm_tower:
            _set_timm_size(model, input_size)
        return _describe(tc, model, input_size, timm_tower)


def _load(tc: TeacherConfig, model: torch.nn.Module, path: Path) -> None:
    """Local weights through open_clip's own loader (weights-only; converts known third-party layouts)."""
    try:
        incompatible = open_clip.load_checkpoint(model, str(path), strict=False, weights_only=True)
    except RuntimeError as e:
        text = str(e)
        if "size mismatch" in text:
            first = next(line for line in text.splitlines() if "size mismatch" in line)
            raise load_error(tc.name, path, f"tensor shapes do not match open_clip '{tc.model}' ({first.strip()})",
                             EXPECTED) from None
        raise load_error(tc.name, path, f"not a readable weights-only checkpoint ({one_line(text, 120)})",
                         EXPECTED) from None
    except Exception as e:
        raise load_error(tc.name, path, f"not a readable weights-only checkpoint ({type(e).__name__}: "
                         f"{one_line(e, 120)})", EXPECTED) from None
    missing = list(getattr(incompatible, "missing_keys", []))
    unexpected = list(getattr(incompatible, "unexpected_keys", []))
    if missing or unexpected:
        parts = [f"{len(missing)} missing, e.g. '{missing[0]}'"] if missing else []
        parts += [f"{len(unexpected)} unexpected, e.g. '{unexpected[0]}'"] if unexpected else []
        raise load_error(tc.name, path, f"keys do not match open_clip '{tc.model}' ({'; '.join(parts)})", EXPECTED)


class OpenClipTeacher(Teacher):
    """An open_clip model as a teacher; the text tower stays available for zero-shot.

    A ViT tower is switched to `output_tokens=True`, so `teacher.model.visual(x)` returns (pooled, tokens);
    use `teacher.encode_image` for the embedding alone.
    """

    def __init__(self, spec: TeacherSpec, model: torch.nn.Module, timm_tower: bool):
        super().__init__()
        self.adopt_spec(spec)
        self.model = model
        self.timm_tower = timm_tower
        if not timm_tower:
            model.visual.output_tokens = True  # the tower now returns (pooled, tokens)
        self._tokenizer = None

    def forward(self, images: torch.Tensor) -> TeacherOutput:
        """summary = encode_image(images) [B, summary_dim]; spatial = unprojected patch tokens [B, embed_dim, h, w]."""
        x = self.check_input(images)
        visual = self.model.visual
        if self.timm_tower:
            feats = visual.trunk.forward_features(x)
            summary = visual.head(visual.trunk.forward_head(feats))
            if feats.ndim == 4:
                return TeacherOutput(summary.float(), feats.float())
            tokens = feats[:, getattr(visual.trunk, "num_prefix_tokens", 0):]
        else:
            summary, tokens = visual(x)
        return TeacherOutput(summary.float(), tokens_to_grid(tokens, self.grid_size).float())

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """The CLIP image embedding (unnormalised), as open_clip's encode_image."""
        return self.forward(images).summary

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """The CLIP text embedding (unnormalised) of tokenizer output."""
        return self.model.encode_text(tokens).float()

    @property
    def context_length(self) -> int:
        """Token sequence length the text tower takes."""
        return int(getattr(self.model, "context_length", None) or self.model.text.context_length)

    @property
    def tokenizer(self):
        """open_clip's tokenizer for this model (loaded on first use; SigLIP's needs a cached HF tokenizer)."""
        if self._tokenizer is None:
            self._tokenizer = open_clip.get_tokenizer(self.spec.model, context_length=self.context_length)
        return self._tokenizer


def build(tc: TeacherConfig, device: torch.device) -> OpenClipTeacher:
    """The open_clip teacher: seeded random init, then the local checkpoint unless random_init."""
    s = teacher_spec(tc)
    path = None if tc.random_init else resolve_checkpoint(tc.name, tc.checkpoint, EXPECTED)  # fail before building
    with constructing(tc.init_seed, tc.random_init, device) as where:
        model, input_size, timm_tower = _create(tc, str(where))
    if path is not None:
        _load(tc, model, path)
    if timm_tower:
        _set_timm_size(model, input_size)
    return OpenClipTeacher(s, model, timm_tower)


__all__ = ["OpenClipTeacher", "build", "spec"]

"""SAM teachers through segment_anything: the ViTDet image encoder of vit_b / vit_l / vit_h.

Spatial = the image encoder's output, the [B, 256, 64, 64] neck map that SAM's mask decoder consumes (patch
size 16 at 1024 px); SAM has no summary. Input as SAM prepares it (`SamPredictor` / `Sam.preprocess`): the
longest side resized to input_size (`ResizeLongestSide`), normalised with SAM's pixel mean/std, zero-padded
bottom/right to a square — resize_mode "longest_pad".

The teacher keeps the whole segment_anything `Sam` (`teacher.sam`: image encoder + prompt encoder + mask
decoder), so evaluation can decode masks from student features with SAM's own decoder (`teacher.predictor()`
for whole images). `decoder_loaded` says whether the checkpoint held the decoder: a full SAM .pth
(keys `image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`) does; an encoder-only state dict leaves it random.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything import SamPredictor
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from radio_scale.config.schema import TeacherConfig
from radio_scale.teachers.base import Teacher, TeacherOutput, constructing
from radio_scale.teachers.checkpoints import load_strict, read_checkpoint
from radio_scale.teachers.spec import (
    TeacherSpec, check_multiple, forward_flops, normalisation, param_count, split_kwargs, teacher_spec,
)

EXPECTED = ("a segment_anything SAM checkpoint (.pth, weights-only) with image_encoder.* keys, "
            "or an image-encoder state dict")
PATCH_SIZE = 16
NATIVE_SIZE = 1024
# segment_anything's build_sam_vit_{b,l,h} constants (its registry builds full models; these build the same ones).
ENCODERS = {
    "vit_b": {"width": 768, "depth": 12, "heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
    "vit_l": {"width": 1024, "depth": 24, "heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "vit_h": {"width": 1280, "depth": 32, "heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
}
SHARED = {"window_size": 14, "out_chans": 256}
TINY = {"width": 64, "depth": 2, "heads": 2, "global_attn_indexes": (1,), "window_size": 4, "out_chans": 32,
        "input_size": 128}
SIZE_KEYS = ("width", "depth", "heads", "global_attn_indexes", "window_size", "out_chans")
# SAM's pixel statistics on 0..255, expressed on 0..1 pixels.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def _arch(tc: TeacherConfig) -> dict:
    """Encoder sizes and input size of a configured SAM teacher."""
    if tc.model not in ENCODERS:
        raise ValueError(f"teacher '{tc.name}': unknown SAM model '{tc.model}' (known: {', '.join(ENCODERS)})")
    opts, library = split_kwargs(tc, SIZE_KEYS)
    if library:
        raise ValueError(f"teacher '{tc.name}': unknown model_kwargs {sorted(library)} for SAM "
                         f"(known: {', '.join(('tiny', 'mean', 'std') + SIZE_KEYS)})")
    tiny = bool(opts.get("tiny"))
    overrides = {k: v for k, v in opts.items() if k in SIZE_KEYS}
    arch = {**ENCODERS[tc.model], **SHARED, **(TINY if tiny else {}), **overrides}
    arch["global_attn_indexes"] = tuple(arch["global_attn_indexes"])
    arch["input_size"] = tc.input_size or (TINY["input_size"] if tiny else NATIVE_SIZE)
    arch["tiny"] = tiny
    check_multiple(tc, arch["input_size"], PATCH_SIZE)
    return arch


def _create(arch: dict) -> Sam:
    """A segment_anything Sam with the given encoder sizes; the prompt encoder and decoder match its embedding."""
    size, chans, tiny = arch["input_size"], arch["out_chans"], arch["tiny"]
    grid = size // PATCH_SIZE
    encoder = ImageEncoderViT(
        img_size=size, patch_size=PATCH_SIZE, embed_dim=arch["width"], depth=arch["depth"], num_heads=arch["heads"],
        mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
        global_attn_indexes=arch["global_attn_indexes"], window_size=arch["window_size"], out_chans=chans,
    )
    prompt = PromptEncoder(embed_dim=chans, image_embedding_size=(grid, grid), input_image_size=(size, size),
                           mask_in_chans=4 if tiny else 16)
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=chans, mlp_dim=64 if tiny else 2048,
                                      num_heads=2 if tiny else 8),
        transformer_dim=chans, iou_head_depth=3, iou_head_hidden_dim=32 if tiny else 256,
    )
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder,
               pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD)).eval()


def spec(tc: TeacherConfig) -> TeacherSpec:
    """Spec of a SAM teacher from segment_anything's constants (parameters counted on the meta device)."""
    arch = _arch(tc)
    with torch.device("meta"):
        params = param_count(_create(arch))
    size, width, chans = arch["input_size"], arch["width"], arch["out_chans"]
    grid = (size // PATCH_SIZE, size // PATCH_SIZE)
    tokens = grid[0] * grid[1]
    neck = 2.0 * tokens * width * chans + 2.0 * tokens * chans * chans * 9  # 1x1 then 3x3 conv
    gflops = forward_flops(width, arch["depth"], grid, PATCH_SIZE, prefix_tokens=0,
                           window_size=arch["window_size"], global_blocks=arch["global_attn_indexes"],
                           rel_pos=True, extra_flops=neck) / 1e9
    mean, std = normalisation(tc, [m / 255 for m in PIXEL_MEAN], [s / 255 for s in PIXEL_STD])
    return TeacherSpec(
        name=tc.name, family=tc.family, model=tc.model, input_size=size, patch_size=PATCH_SIZE, grid_size=grid,
        embed_dim=chans, summary_dim=0, has_summary=False, mean=mean, std=std, resize_mode="longest_pad",
        params=params, forward_gflops=gflops,
    )


def _resample(state: dict[str, torch.Tensor], module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Fit SAM's absolute position grid (bicubic) and global-attention relative positions (linear, as SAM's
    own get_rel_pos) to an input size other than the checkpoint's."""
    own = module.state_dict()
    out = dict(state)
    for key, value in state.items():
        target = own.get(key)
        if target is None or target.shape == value.shape:
            continue
        local = key[len(prefix):]
        if local == "pos_embed" and value.ndim == 4 and value.shape[-1] == target.shape[-1]:
            grid = value.permute(0, 3, 1, 2).float()
            out[key] = F.interpolate(grid, size=tuple(target.shape[1:3]), mode="bicubic",
                                     align_corners=False).permute(0, 2, 3, 1).to(value.dtype)
        elif local.endswith(("rel_pos_h", "rel_pos_w")) and value.ndim == 2 and value.shape[1] == target.shape[1]:
            line = value.t().unsqueeze(0).float()
            out[key] = F.interpolate(line, size=target.shape[0], mode="linear").squeeze(0).t().to(value.dtype)
    return out


def _load(tc: TeacherConfig, sam: Sam, path: Path, state: dict) -> bool:
    """Local weights into the whole Sam, or into its image encoder only; True when the decoder was loaded."""
    if any(k.startswith("image_encoder.") for k in state):
        load_strict(tc.name, path, sam, _resample(state, sam, "image_encoder."),
                    f"segment_anything Sam '{tc.model}'", EXPECTED)
        return True
    load_strict(tc.name, path, sam.image_encoder, _resample(state, sam.image_encoder, ""),
                f"the image encoder of SAM '{tc.model}'", EXPECTED)
    return False


class SamTeacher(Teacher):
    """SAM's image encoder as a teacher, with SAM's prompt encoder and mask decoder kept alongside."""

    def __init__(self, spec: TeacherSpec, sam: Sam, decoder_loaded: bool):
        super().__init__()
        self.adopt_spec(spec)
        self.model = sam
        self.decoder_loaded = decoder_loaded

    @property
    def sam(self) -> Sam:
        """The segment_anything Sam (image encoder + prompt encoder + mask decoder)."""
        return self.model

    def forward(self, images: torch.Tensor) -> TeacherOutput:
        """spatial = the image encoder's neck output [B, out_chans, input_size/16, input_size/16]; no summary."""
        return TeacherOutput(None, self.model.image_encoder(self.check_input(images)).float())

    def predictor(self) -> SamPredictor:
        """segment_anything's SamPredictor on this teacher's Sam (whole-image prompts -> masks)."""
        return SamPredictor(self.model)


def build(tc: TeacherConfig, device: torch.device) -> SamTeacher:
    """The SAM teacher: seeded random init, then the local checkpoint unless random_init."""
    s = teacher_spec(tc)
    weights = None if tc.random_init else read_checkpoint(tc, EXPECTED)  # fail before building
    with constructing(tc.init_seed, tc.random_init, device):
        sam = _create(_arch(tc))
    decoder_loaded = False if weights is None else _load(tc, sam, *weights)
    return SamTeacher(s, sam, decoder_loaded)

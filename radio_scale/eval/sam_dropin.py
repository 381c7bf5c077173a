"""SAM drop-in: the student's SAM-head features decoded by SAM's own prompt encoder + mask decoder."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam
from segment_anything.utils.transforms import ResizeLongestSide


@dataclass
class SamDecoder:
    """SAM's prompt encoder and mask decoder, detached from its image encoder."""

    prompt_encoder: PromptEncoder
    mask_decoder: MaskDecoder
    mask_threshold: float = 0.0

    @property
    def img_size(self) -> int:
        """Side of SAM's square (padded) input in pixels."""
        return int(self.prompt_encoder.input_image_size[0])

    @property
    def embedding_size(self) -> tuple[int, int]:
        """Grid (h, w) of the image embedding the decoder expects."""
        return tuple(self.prompt_encoder.image_embedding_size)


def sam_decoder_of(obj) -> SamDecoder:
    """Find SAM's prompt encoder + mask decoder on a SAM teacher, a segment_anything Sam, or a holder of either."""
    candidates = [obj] + [getattr(obj, a) for a in ("sam", "model") if hasattr(obj, a)]
    for c in candidates:
        pe, md = getattr(c, "prompt_encoder", None), getattr(c, "mask_decoder", None)
        if isinstance(pe, PromptEncoder) and isinstance(md, MaskDecoder):
            return SamDecoder(pe, md, float(getattr(c, "mask_threshold", Sam.mask_threshold)))
    name = getattr(obj, "name", type(obj).__name__)
    raise TypeError(f"SAM drop-in: '{name}' exposes no segment_anything prompt_encoder + mask_decoder")


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY pixel boxes [N, 4] of binary masks [N, H, W] (x1, y1 inclusive; x2, y2 exclusive)."""
    boxes = []
    for m in masks.bool():
        ys, xs = torch.nonzero(m, as_tuple=True)
        if len(ys) == 0:
            raise ValueError("SAM drop-in: an empty ground-truth mask has no box")
        boxes.append(torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float())
    return torch.stack(boxes) if boxes else torch.zeros(0, 4)


@torch.no_grad()
def decode_box_masks(
    decoder: SamDecoder,
    embedding: torch.Tensor,
    boxes: torch.Tensor,
    original_size: tuple[int, int],
) -> torch.Tensor:
    """One image: embedding [1|C, h, w] + XYXY boxes [N, 4] in original pixels -> mask logits [N, H, W] (CPU).

    The image was shown to the encoder SAM-style: longest side resized to img_size, zero-padded
    bottom/right. An embedding on another grid (a student at another resolution) is resized
    bilinearly to SAM's grid first.
    """
    emb = embedding if embedding.ndim == 4 else embedding[None]
    if emb.shape[:2] != (1, decoder.prompt_encoder.embed_dim):
        raise ValueError(f"SAM drop-in: embedding {list(emb.shape)} is not [1, {decoder.prompt_encoder.embed_dim}, h, w]")
    if tuple(emb.shape[-2:]) != decoder.embedding_size:
        emb = F.interpolate(emb.float(), size=decoder.embedding_size, mode="bilinear", align_corners=False)
    param = next(decoder.mask_decoder.parameters())
    emb = emb.to(param.device, param.dtype)
    transform = ResizeLongestSide(decoder.img_size)
    in_boxes = transform.apply_boxes_torch(boxes.float(), original_size).to(emb.device)
    sparse, dense = decoder.prompt_encoder(points=None, boxes=in_boxes, masks=None)
    low_res, _ = decoder.mask_decoder(
        image_embeddings=emb,
        image_pe=decoder.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    # same post-processing as Sam.postprocess_masks: to the padded input, crop the padding, to the original
    input_size = ResizeLongestSide.get_preprocess_shape(original_size[0], original_size[1], decoder.img_size)
    masks = F.interpolate(low_res, (decoder.img_size, decoder.img_size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    masks = F.interpolate(masks, original_size, mode="bilinear", align_corners=False)
    return masks[:, 0].float().cpu()


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of paired binary masks [N, H, W] -> [N]; two empty masks agree perfectly (1.0)."""
    a, b = a.bool().flatten(1), b.bool().flatten(1)
    inter = (a & b).sum(1).double()
    union = (a | b).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@torch.no_grad()
def evaluate_sam_dropin(
    student_embed_fn: Callable[[torch.Tensor], torch.Tensor],
    teacher,
    images: Sequence[torch.Tensor],
    gt_masks: Optional[Sequence[torch.Tensor]] = None,
    boxes: Optional[Sequence[torch.Tensor]] = None,
    teacher_embed_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    mask_threshold: Optional[float] = None,
) -> dict[str, float]:
    """Box-prompted masks from the student's embedding vs the SAM teacher's own masks (and ground truth).

    images: 0..1 pixels [3, H, W] each (any size); embed fns map one such image batch [1, 3, H, W]
    to a SAM-style embedding [1, 256, h, w]. Boxes default to the ground-truth masks' boxes.
    mask_threshold: logit threshold of a mask pixel (default: SAM's own, 0.0).
    Returns mean mask IoU student vs teacher ("agreement_iou"), the mean squared difference of their
    mask logits ("logit_mse"), and both IoUs vs ground truth when given.
    """
    from radio_scale.eval.encoders import teacher_spatial_encoder

    decoder = sam_decoder_of(teacher)
    threshold = decoder.mask_threshold if mask_threshold is None else mask_threshold
    teacher_embed_fn = teacher_embed_fn or teacher_spatial_encoder(teacher)
    if boxes is None:
        if gt_masks is None:
            raise ValueError("SAM drop-in: give box prompts or ground-truth masks to derive them from")
        boxes = [boxes_from_masks(m) for m in gt_masks]
    agree, logit_se, s_gt, t_gt = [], [], [], []
    for i, image in enumerate(images):
        if len(boxes[i]) == 0:
            continue
        size = tuple(image.shape[-2:])
        s_logits = decode_box_masks(decoder, student_embed_fn(image[None]), boxes[i], size)
        t_logits = decode_box_masks(decoder, teacher_embed_fn(image[None]), boxes[i], size)
        s_masks, t_masks = s_logits > threshold, t_logits > threshold
        agree.append(mask_iou(s_masks, t_masks))
        logit_se.append((s_logits.double() - t_logits.double()).pow(2).flatten(1).mean(1))
        if gt_masks is not None:
            s_gt.append(mask_iou(s_masks, gt_masks[i].cpu()))
            t_gt.append(mask_iou(t_masks, gt_masks[i].cpu()))
    if not agree:
        raise ValueError("SAM drop-in: no image had a box prompt")
    out = {"agreement_iou": float(torch.cat(agree).mean()), "logit_mse": float(torch.cat(logit_se).mean()),
           "num_masks": float(sum(len(a) for a in agree))}
    if gt_masks is not None:
        out["student_gt_iou"] = float(torch.cat(s_gt).mean())
        out["teacher_gt_iou"] = float(torch.cat(t_gt).mean())
    return out

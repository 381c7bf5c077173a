"""Zero-shot classification: a text classifier from the CLIP teacher's text tower, images from any encoder."""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from radio_scale.eval.knn import extract_features, topk_accuracy

Template = Union[str, Callable[[str], str]]

__all__ = [
    "IMAGENET_CLASSNAMES", "OPENAI_IMAGENET_TEMPLATES", "SIMPLE_IMAGENET_TEMPLATES",
    "build_zeroshot_classifier", "zeroshot_classify", "evaluate_zeroshot",
]


class _TextTower:
    """The teacher's text side in the shape open_clip's classifier builder calls: encode_text(tokens, normalize)."""

    def __init__(self, teacher):
        self.teacher = teacher

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        emb = self.teacher.encode_text(tokens).float()
        return F.normalize(emb, dim=-1) if normalize else emb


def build_zeroshot_classifier(
    teacher, classnames: Sequence[str], templates: Optional[Sequence[Template]] = None, batch_classes: int = 10
) -> torch.Tensor:
    """Class weights [D, C]: per class, the mean of the normalised text embeddings of its prompts, normalised.

    teacher: the CLIP teacher (encode_text + tokenizer). templates: open_clip's SIMPLE_IMAGENET_TEMPLATES
    by default (OPENAI_IMAGENET_TEMPLATES for the 80-prompt ensemble).
    """
    for attr in ("encode_text", "tokenizer"):
        if not hasattr(teacher, attr):
            raise TypeError(f"zero-shot: teacher '{getattr(teacher, 'name', teacher)}' has no text tower ({attr})")
    if not classnames:
        raise ValueError("zero-shot: no class names")
    device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    return build_zero_shot_classifier(
        _TextTower(teacher), teacher.tokenizer, list(classnames), list(templates or SIMPLE_IMAGENET_TEMPLATES),
        num_classes_per_batch=batch_classes, device=device,
    ).float()


def zeroshot_classify(image_embeds: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1/top-5 accuracy of cosine logits between image embeddings [N, D] and class weights [D, C]."""
    if image_embeds.shape[1] != classifier.shape[0]:
        raise ValueError(f"zero-shot: image embeddings have {image_embeds.shape[1]} dims, "
                         f"the text classifier {classifier.shape[0]}")
    logits = F.normalize(image_embeds.float(), dim=1) @ classifier.to(image_embeds.device)
    return topk_accuracy(logits, labels)


def evaluate_zeroshot(
    image_encoder: Callable[[torch.Tensor], torch.Tensor],
    teacher,
    loader: Iterable,
    classnames: Sequence[str],
    templates: Optional[Sequence[Template]] = None,
    classifier: Optional[torch.Tensor] = None,
) -> dict[str, float]:
    """Zero-shot accuracy of `image_encoder` (student CLIP head or the teacher itself) on (images, labels) batches."""
    classifier = build_zeroshot_classifier(teacher, classnames, templates) if classifier is None else classifier
    feats, labels = extract_features(image_encoder, loader)
    return zeroshot_classify(feats, classifier, labels)

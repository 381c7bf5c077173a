"""The student registry: `student.arch` -> a student module under one contract.

- a ViT preset (radio_scale.models.presets.STUDENT_PRESETS): RadioStudent (CPE, summary tokens, σReparam, ...);
- `eradio_b`, `eradio_l` (and `_noup` "w/o upsample" variants, `eradio_pico` for tests): ERadioStudent;
- `timm:<model_name>` with `student.timm_kwargs`: TimmStudent (pretrained=False, nothing downloaded).

Every student returns StudentOutput(summary={teacher: [B, D]}, patches=[B, D, H/stride, W/stride]) and exposes
`embed_dim`, `patch_size` (the stride), `blocks` (FSDP2 wrap units), set_activation_checkpointing,
set_spectral_advance and `cpe.generator`; `student_figures` gives the planner its FLOPs, parameters and memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from radio_scale.models.presets import ERADIO_PRESETS, STUDENT_PRESETS

if TYPE_CHECKING:
    from radio_scale.config.schema import StudentConfig

TIMM_PREFIX = "timm:"


def is_vit(arch: str) -> bool:
    return arch in STUDENT_PRESETS


def known_arch(arch: str) -> bool:
    return is_vit(arch) or arch in ERADIO_PRESETS or (arch.startswith(TIMM_PREFIX) and len(arch) > len(TIMM_PREFIX))


def known_names() -> str:
    return ", ".join([*STUDENT_PRESETS, *ERADIO_PRESETS, "timm:<model_name>"])


def build_any_student(sc: "StudentConfig", summary_teachers: Sequence[str]):
    """The student `sc.arch` names, with one summary output per teacher in `summary_teachers`."""
    if is_vit(sc.arch):
        from radio_scale.models.student import build_student

        return build_student(sc, summary_teachers)
    from radio_scale.models.eradio import ERadioStudent

    if sc.arch in ERADIO_PRESETS:
        return ERadioStudent(ERADIO_PRESETS[sc.arch], list(summary_teachers))
    if sc.arch.startswith(TIMM_PREFIX):
        from radio_scale.models.backbones import TimmStudent

        return TimmStudent(sc.arch[len(TIMM_PREFIX):], list(summary_teachers), dict(sc.timm_kwargs))
    raise ValueError(f"student.arch: unknown '{sc.arch}' (known: {known_names()})")


def build_meta_student(sc: "StudentConfig", summary_teachers: Sequence[str]):
    """The student on the meta device (no memory, no weights): for its stride, parameter count and costs."""
    import torch

    with torch.device("meta"):
        return build_any_student(sc, summary_teachers)


def student_stride(sc: "StudentConfig") -> int:
    """The output stride of the student's patch map (the patch size of a ViT)."""
    if is_vit(sc.arch):
        return sc.patch_size if sc.patch_size is not None else STUDENT_PRESETS[sc.arch].patch_size
    if sc.arch in ERADIO_PRESETS:
        return ERADIO_PRESETS[sc.arch].stride
    return build_meta_student(sc, []).patch_size


@dataclass(frozen=True)
class StudentFigures:
    """What the planner needs of a non-ViT student at one resolution (per image)."""

    params: int
    unit_params: tuple[int, ...]  # parameters of each FSDP2 wrap unit
    width: int  # D of the patch map
    stride: int
    forward_flops: float
    act_bytes: float  # bf16 saved-for-backward bytes without checkpointing
    act_bytes_ckpt: float  # with activation checkpointing per wrap unit


def student_figures(sc: "StudentConfig", num_summary: int, resolution: int) -> StudentFigures:
    """The student's own FLOP, parameter and memory figures at `resolution` (measured on the meta device)."""
    student = build_meta_student(sc, [f"t{i}" for i in range(num_summary)])
    return StudentFigures(
        params=student.param_count(),
        unit_params=tuple(sum(p.numel() for p in u.parameters()) for u in student.blocks),
        width=student.embed_dim, stride=student.patch_size,
        forward_flops=student.forward_flops(resolution),
        act_bytes=student.train_activation_bytes(resolution, False),
        act_bytes_ckpt=student.train_activation_bytes(resolution, True),
    )

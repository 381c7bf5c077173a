"""The student backbone, its adaptor heads and their analytic cost.

Presets and FLOP/parameter helpers are pure Python; the torch modules are imported on first use so that
config loading and dry-run planning stay light.
"""
from radio_scale.models.flops import student_forward_flops, student_param_count
from radio_scale.models.presets import STUDENT_PRESETS, ViTPreset, resolve_student_dims

_LAZY = {
    "RadioStudent": "radio_scale.models.student",
    "StudentOutput": "radio_scale.models.student",
    "Block": "radio_scale.models.student",
    "build_student": "radio_scale.models.student",
    "CroppedPosEmbed": "radio_scale.models.cpe",
    "SpectralLinear": "radio_scale.models.spectral",
    "build_any_student": "radio_scale.models.registry",
    "ERadioStudent": "radio_scale.models.eradio",
    "TimmStudent": "radio_scale.models.backbones",
    "AdaptorHeads": "radio_scale.models.heads",
    "HeadOutput": "radio_scale.models.heads",
}

__all__ = [
    "STUDENT_PRESETS", "ViTPreset", "resolve_student_dims", "student_forward_flops", "student_param_count",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'radio_scale.models' has no attribute '{name}'")

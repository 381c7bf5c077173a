"""Frozen teachers built from their own libraries (open_clip, timm, segment_anything) and local checkpoints.

`build_teacher(tc)` returns a frozen, eval-mode `Teacher`; `teacher_spec(tc)` describes it without building it.
Families are imported on first use, so importing this package stays cheap for the planner.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Union

import torch

from radio_scale.config.schema import TeacherConfig
from radio_scale.teachers.base import Teacher, TeacherLoadError, TeacherOutput
from radio_scale.teachers.spec import TeacherSpec, forward_flops, teacher_spec

# family -> module that defines `spec(tc) -> TeacherSpec` and `build(tc, device) -> Teacher` (not yet frozen)
FAMILIES: dict[str, str] = {
    "open_clip": "radio_scale.teachers.clip",
    "dinov2": "radio_scale.teachers.dinov2",
    "sam": "radio_scale.teachers.sam",
    "timm": "radio_scale.teachers.timm_generic",
}


def family_module(tc: TeacherConfig) -> ModuleType:
    """The adapter module of the teacher's family."""
    if tc.family not in FAMILIES:
        raise ValueError(f"teacher '{tc.name}': unknown family '{tc.family}' (known: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[tc.family])


def build_teacher(tc: TeacherConfig, device: Union[str, torch.device] = "cpu") -> Teacher:
    """The configured teacher: library model, local weights (or seeded random ones), frozen, eval, on device."""
    if tc.checkpoint is None and not tc.random_init:
        raise TeacherLoadError(f"teacher '{tc.name}': no checkpoint set (a local file, pkg:<package>, "
                               "or random_init: true)")
    teacher = family_module(tc).build(tc, torch.device(device))
    return teacher.to(device).freeze()


__all__ = [
    "FAMILIES", "Teacher", "TeacherLoadError", "TeacherOutput", "TeacherSpec",
    "build_teacher", "family_module", "forward_flops", "teacher_spec",
]

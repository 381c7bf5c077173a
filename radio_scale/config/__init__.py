"""Typed, validated run configuration: recipes (YAML) + dotted overrides -> frozen RunConfig."""
from radio_scale.config.loader import (
    ConfigError,
    apply_override,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    flatten,
    load_config,
    recipe_names,
    recipe_path,
    student_patch_size,
)
from radio_scale.config.schema import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    GroupConfig,
    HardwareConfig,
    LossConfig,
    MonitorConfig,
    OptimConfig,
    RunConfig,
    StageConfig,
    StudentConfig,
    TeacherConfig,
    TrackingConfig,
)

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "EvalConfig", "GroupConfig", "HardwareConfig", "LossConfig",
    "MonitorConfig", "OptimConfig", "RunConfig", "StageConfig", "StudentConfig", "TeacherConfig",
    "TrackingConfig", "apply_override", "config_from_dict", "config_to_dict", "config_to_yaml",
    "flatten", "load_config", "recipe_names", "recipe_path", "student_patch_size",
]

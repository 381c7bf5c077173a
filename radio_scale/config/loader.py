"""Load a recipe (YAML), apply dotted overrides, and build a validated, frozen RunConfig."""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from radio_scale.config.schema import (
    GroupConfig,
    RunConfig,
    StageConfig,
    TeacherConfig,
)
from radio_scale.models.presets import STUDENT_PRESETS


class ConfigError(ValueError):
    """A bad configuration: the message is one line naming the key and the file."""


def recipe_names() -> list[str]:
    """Names of the recipes shipped with the package."""
    root = resources.files("radio_scale.config") / "recipes"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def recipe_path(recipe: str) -> Path:
    """A shipped recipe name or a path to a YAML file -> the file's path."""
    if recipe.endswith((".yaml", ".yml")) or os.sep in recipe:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {recipe}")
        return path
    path = Path(str(resources.files("radio_scale.config") / "recipes" / f"{recipe}.yaml"))
    if not path.is_file():
        raise ConfigError(f"unknown recipe '{recipe}' (shipped: {', '.join(recipe_names())})")
    return path


def load_config(recipe: str, overrides: typing.Sequence[str] = (), check_files: bool = False) -> RunConfig:
    """Recipe name or file + `key=value` overrides -> validated RunConfig.

    check_files: also require every teacher checkpoint to exist (training does; a dry-run does not).
    """
    path = recipe_path(recipe)
    src = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{src}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: a recipe must be a mapping of sections")
    for ov in overrides:
        apply_override(raw, ov, src)
    cfg = build_config(raw, src)
    validate(cfg, src, check_files=check_files)
    return cfg


def apply_override(raw: dict, override: str, src: str = "<overrides>") -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to the raw recipe dict in place."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like key=value (e.g. optim.lr=5e-4)")
    key, value = override.split("=", 1)
    parts = key.strip().split(".")
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        parsed = value
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override key '{key}': '{here}' is not an index of a list of {len(node)}")
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"override key '{key}': '{here}' is not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override key '{key}': '{last}' is not an index of a list of {len(node)}")
        node[int(last)] = parsed
    elif isinstance(node, dict):
        node[last] = parsed
    else:
        raise ConfigError(f"override key '{key}': its parent is not a section")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, src: str) -> Any:
    """Check/convert a YAML value to the annotated type; ConfigError naming the key otherwise."""
    origin = get_origin(tp)
    bad = ConfigError(f"{src}: key '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, src)
            except ConfigError as e:
                errors.append(e)
        raise bad
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{src}: key '{key}' must be one of {choices}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}.{i}", src) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{src}: key '{key}' must have {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}.{i}", src) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _build(tp, value, key, src)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise bad


def _build(cls: type, raw: Any, prefix: str, src: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: key '{prefix}' must be a mapping, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(f"{src}: unknown key '{where}' (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], key, src)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{src}: missing required key '{key}'")
    return cls(**kwargs)


def build_config(raw: dict, src: str) -> RunConfig:
    """Raw recipe dict -> RunConfig (types checked, unknown keys refused)."""
    raw = dict(raw)
    teachers = raw.get("teachers", {})
    if not isinstance(teachers, dict):
        raise ConfigError(f"{src}: key 'teachers' must be a mapping of teacher name -> settings")
    tlist = []
    for name, t in teachers.items():
        if not isinstance(t, dict):
            raise ConfigError(f"{src}: key 'teachers.{name}' must be a mapping")
        tlist.append(_build(TeacherConfig, {"name": name, **t}, f"teachers.{name}", src))
    raw["teachers"] = tlist
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{src}: key 'stages' must be a non-empty list")
    slist = []
    for i, s in enumerate(stages):
        if not isinstance(s, dict):
            raise ConfigError(f"{src}: key 'stages.{i}' must be a mapping")
        groups = s.get("groups")
        if not isinstance(groups, list) or not groups:
            raise ConfigError(f"{src}: key 'stages.{i}.groups' must be a non-empty list")
        glist = [_build(GroupConfig, g, f"stages.{i}.groups.{j}", src) for j, g in enumerate(groups)]
        slist.append(_build(StageConfig, {**s, "groups": glist}, f"stages.{i}", src))
    raw["stages"] = slist
    # already-built sections pass through _coerce as dataclass instances
    hints = get_type_hints(RunConfig)
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    for k in raw:
        if k not in fields:
            raise ConfigError(f"{src}: unknown key '{k}' (allowed: {', '.join(fields)})")
    kwargs: dict[str, Any] = {"teachers": tuple(tlist), "stages": tuple(slist)}
    for name, f in fields.items():
        if name in ("teachers", "stages"):
            continue
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], name, src)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{src}: missing required key '{name}'")
    return RunConfig(**kwargs)


def student_patch_size(cfg: RunConfig) -> int:
    """The student's patch size (explicit, or from its preset)."""
    if cfg.student.patch_size is not None:
        return cfg.student.patch_size
    return STUDENT_PRESETS[cfg.student.arch].patch_size


def validate(cfg: RunConfig, src: str, check_files: bool = False) -> None:
    """Cross-field checks; raise ConfigError naming the offending key."""
    if cfg.student.arch not in STUDENT_PRESETS:
        raise ConfigError(
            f"{src}: key 'student.arch' is '{cfg.student.arch}', known: {', '.join(STUDENT_PRESETS)}"
        )
    if cfg.distributed_backend != "fsdp2":
        raise ConfigError(f"{src}: key 'distributed_backend' is '{cfg.distributed_backend}': only 'fsdp2' is "
                          "implemented in this version")
    patch = student_patch_size(cfg)
    names = [t.name for t in cfg.teachers]
    if not names:
        raise ConfigError(f"{src}: key 'teachers' declares no teacher")
    for t in cfg.teachers:
        key = f"teachers.{t.name}"
        if t.checkpoint is None and not t.random_init:
            raise ConfigError(f"{src}: key '{key}.checkpoint' is not set (a local checkpoint path, or random_init: true)")
        packaged = t.checkpoint is not None and t.checkpoint.startswith("pkg:")  # resolved by the teacher loader
        if check_files and t.checkpoint is not None and not t.random_init and not packaged and not Path(t.checkpoint).is_file():
            raise ConfigError(f"{src}: key '{key}.checkpoint': file not found: {t.checkpoint}")
    if not (0 <= cfg.loss.alpha and 0 <= cfg.loss.beta):
        raise ConfigError(f"{src}: keys 'loss.alpha'/'loss.beta' must be >= 0")
    for key in ("gpu_memory_gb", "gpu_tflops"):
        value = getattr(cfg.hardware, key)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{src}: key 'hardware.{key}' must be > 0, got {value}")
    for w in cfg.student.window_sizes:
        if w < 0:
            raise ConfigError(f"{src}: key 'student.window_sizes' holds {w}; use 0 for global attention")
    if cfg.optim.schedule == "run" and cfg.stages[0].lr is not None:
        raise ConfigError(f"{src}: key 'stages.0.lr' is set, but optim.schedule 'run' peaks at optim.lr: "
                          "set optim.lr instead, or optim.schedule=per_stage")
    for i, stage in enumerate(cfg.stages):
        if stage.steps <= 0:
            raise ConfigError(f"{src}: key 'stages.{i}.steps' must be > 0, got {stage.steps}")
        if stage.warmup_steps < 0:
            raise ConfigError(f"{src}: key 'stages.{i}.warmup_steps' must be >= 0, got {stage.warmup_steps}")
        if cfg.optim.schedule == "run" and i > 0 and (stage.warmup_steps or stage.lr is not None):
            key = "warmup_steps" if stage.warmup_steps else "lr"
            raise ConfigError(f"{src}: key 'stages.{i}.{key}' is set, but optim.schedule 'run' warms up once "
                              "(stages.0.warmup_steps) and peaks at optim.lr: remove it or set optim.schedule=per_stage")
        seen = set()
        for j, g in enumerate(stage.groups):
            key = f"stages.{i}.groups.{j}"
            if g.name in seen:
                raise ConfigError(f"{src}: key '{key}.name': group '{g.name}' appears twice in stage '{stage.name}'")
            seen.add(g.name)
            if g.resolution <= 0 or g.resolution % patch:
                raise ConfigError(
                    f"{src}: key '{key}.resolution' is {g.resolution}, not a multiple of the student patch size {patch}"
                )
            if g.batch_per_rank <= 0:
                raise ConfigError(f"{src}: key '{key}.batch_per_rank' must be > 0")
            if not 0 < g.sampling_rate <= 1:
                raise ConfigError(f"{src}: key '{key}.sampling_rate' must be in (0, 1], got {g.sampling_rate}")
            if isinstance(g.ranks, str) and g.ranks != "auto":
                raise ConfigError(f"{src}: key '{key}.ranks' must be a count, a fraction or 'auto', got {g.ranks!r}")
            if isinstance(g.ranks, float) and not 0 < g.ranks <= 1:
                raise ConfigError(f"{src}: key '{key}.ranks' as a fraction must be in (0, 1], got {g.ranks}")
            if isinstance(g.ranks, int) and not isinstance(g.ranks, bool) and g.ranks <= 0:
                raise ConfigError(f"{src}: key '{key}.ranks' must be > 0, got {g.ranks}")
            if not g.teachers:
                raise ConfigError(f"{src}: key '{key}.teachers' is empty")
            for t in g.teachers:
                if t not in names:
                    raise ConfigError(
                        f"{src}: key '{key}.teachers' names undeclared teacher '{t}' (declared: {', '.join(names)})"
                    )


def config_to_dict(cfg: Any) -> Any:
    """RunConfig -> plain nested dict/list (for YAML printing, MLflow params, checkpoints)."""
    if dataclasses.is_dataclass(cfg):
        out = {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
        if isinstance(cfg, RunConfig):
            out["teachers"] = {t.name: {k: v for k, v in config_to_dict(t).items() if k != "name"} for t in cfg.teachers}
        return out
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def config_to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML that load_config reads back to an equal RunConfig."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_from_dict(raw: dict, src: str = "<dict>") -> RunConfig:
    """Plain dict (e.g. from a checkpoint or export) -> validated RunConfig."""
    cfg = build_config(raw, src)
    validate(cfg, src)
    return cfg


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a.b.c': value} (for MLflow params)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, list) and d and any(isinstance(v, (dict, list)) for v in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}.{i}"))
    else:
        out[prefix] = d
    return out


__all__ = [
    "ConfigError",
    "load_config",
    "apply_override",
    "build_config",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "flatten",
    "recipe_names",
    "recipe_path",
    "student_patch_size",
    "validate",
]

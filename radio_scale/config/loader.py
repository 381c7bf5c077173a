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
    raw = read_yaml_file(path, "recipe")
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: a recipe must be a mapping of sections, got {_yaml_kind(raw)}")
    for ov in overrides:
        apply_override(raw, ov, src)
    cfg = build_config(raw, src)
    validate(cfg, src, check_files=check_files)
    return cfg


def read_yaml_file(path: Path, what: str) -> Any:
    """The YAML document in `path`; ConfigError naming the file when it is unreadable, not UTF-8 or not YAML."""
    src = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{src}: cannot read the {what} file ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{src}: line {line}: the {what} file is not UTF-8 text (byte {data[e.start]:#04x} at "
                          f"offset {e.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{src}:{where} is not valid YAML ({problem})") from None


def _yaml_kind(value: Any) -> str:
    return "an empty file" if value is None else f"a {type(value).__name__}"


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
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                raise bad from None
        else:
            raise bad
        if not math.isfinite(number):  # no key of a run or cluster config means anything as NaN or infinity
            raise ConfigError(f"{src}: key '{key}' must be a finite number, got {value!r}")
        return number
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
    if "deepspeed_stage" in raw:  # the key of earlier versions (their run and export config.yaml files)
        legacy = raw.pop("deepspeed_stage")
        ds = raw.setdefault("deepspeed", {})
        if isinstance(ds, dict):
            ds.setdefault("zero_stage", legacy)
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
    if cfg.student.arch not in STUDENT_PRESETS:  # E-RADIO / timm:<name>: the output stride of the patch map
        from radio_scale.models.registry import student_stride

        return student_stride(cfg.student)
    if cfg.student.patch_size is not None:
        return cfg.student.patch_size
    return STUDENT_PRESETS[cfg.student.arch].patch_size


def validate(cfg: RunConfig, src: str, check_files: bool = False, for_training: bool = True) -> None:
    """Cross-field checks; raise ConfigError naming the offending key.

    for_training=False (a config read back to evaluate or export a model): the checks that only matter to a
    running job (the order of its timeouts) are skipped, so models of earlier runs still load.
    """
    _check_standardize(cfg, src)
    from radio_scale.models.registry import TIMM_PREFIX, known_arch, known_names

    if not known_arch(cfg.student.arch):
        raise ConfigError(f"{src}: key 'student.arch' is '{cfg.student.arch}', known: {known_names()}")
    if cfg.student.timm_kwargs and not cfg.student.arch.startswith(TIMM_PREFIX):
        raise ConfigError(f"{src}: key 'student.timm_kwargs' is set, but student.arch '{cfg.student.arch}' is not "
                          "a timm:<name> student")
    if cfg.student.arch.startswith(TIMM_PREFIX):
        try:
            import timm
        except ImportError:  # pragma: no cover - timm is a dependency
            timm = None
        if timm is not None and not timm.is_model(cfg.student.arch[len(TIMM_PREFIX):]):
            raise ConfigError(f"{src}: key 'student.arch' is '{cfg.student.arch}': timm has no model "
                              f"'{cfg.student.arch[len(TIMM_PREFIX):]}'")
        try:
            student_patch_size(cfg)  # builds it on the meta device: bad kwargs fail here, with the key
        except Exception as e:  # noqa: BLE001 - any construction error is a config error here
            raise ConfigError(f"{src}: key 'student.timm_kwargs': timm model '{cfg.student.arch[len(TIMM_PREFIX):]}' "
                              f"does not build with {dict(cfg.student.timm_kwargs)}: {str(e).splitlines()[0][:200]}")
    check_values(cfg, src)
    _check_backend(cfg, src)
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
    # Timeouts in order: every watchdog phase timeout below the collective timeout, so that a hang is caught by
    # the watchdog (stack dump, HANG marker, requeue) before NCCL's timeout aborts every rank without a word.
    mon = cfg.monitor
    phases = {"monitor.hang_timeout_s": mon.hang_timeout_s, "monitor.startup_timeout_s": mon.startup_timeout_s,
              "monitor.checkpoint_timeout_s": mon.checkpoint_timeout_s}
    for key, value in [*phases.items(), ("monitor.collective_timeout_s", mon.collective_timeout_s),
                       ("monitor.heartbeat_every_s", mon.heartbeat_every_s)]:
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{src}: key '{key}' must be > 0, got {value}")
    if mon.heartbeat_every < 0:
        raise ConfigError(f"{src}: key 'monitor.heartbeat_every' must be >= 0 (0: by time only), got {mon.heartbeat_every}")
    too_long = [f"{k}={v:g}" for k, v in phases.items() if v >= mon.collective_timeout_s]
    if too_long and for_training:
        raise ConfigError(f"{src}: key 'monitor.collective_timeout_s' ({mon.collective_timeout_s:g}) must exceed every "
                          f"watchdog timeout, but {', '.join(too_long)}: raise monitor.collective_timeout_s above "
                          f"{max(phases.values()):g} (or lower those), so the watchdog reports a hang before the "
                          "collective timeout aborts every rank")
    if cfg.hardware.ranks_per_node < 1:
        raise ConfigError(f"{src}: key 'hardware.ranks_per_node' must be >= 1, got {cfg.hardware.ranks_per_node}")
    if cfg.parallel.shard_group_size < 0:
        raise ConfigError(f"{src}: key 'parallel.shard_group_size' must be >= 0 (0: hardware.ranks_per_node), "
                          f"got {cfg.parallel.shard_group_size}")
    if not (cfg.hardware.interconnect_gbps > 0 and math.isfinite(cfg.hardware.interconnect_gbps)):
        raise ConfigError(f"{src}: key 'hardware.interconnect_gbps' must be > 0, got {cfg.hardware.interconnect_gbps}")


def _check_backend(cfg: RunConfig, src: str) -> None:
    """distributed_backend and its options: a bad combination is one line naming the key."""
    ds = cfg.deepspeed
    if ds.zero_stage not in (1, 2, 3):
        raise ConfigError(f"{src}: key 'deepspeed.zero_stage' is {ds.zero_stage}: DeepSpeed ZeRO stages are 1, 2 and 3")
    if cfg.distributed_backend == "deepspeed":
        if ds.offload_param != "none" and ds.zero_stage != 3:
            raise ConfigError(f"{src}: key 'deepspeed.offload_param' is '{ds.offload_param}': parameter offload "
                              f"needs deepspeed.zero_stage 3 (it is {ds.zero_stage})")
        if cfg.parallel.student_sharding == "hybrid":
            raise ConfigError(f"{src}: key 'parallel.student_sharding' is 'hybrid': HSDP is the fsdp2 backend's; "
                              "with distributed_backend deepspeed use 'world' or 'auto'")
        if not isinstance(ds.config, dict):
            raise ConfigError(f"{src}: key 'deepspeed.config' must be a mapping of DeepSpeed config keys")
    else:
        for key in ("offload_optimizer", "offload_param"):
            if getattr(ds, key) != "none":
                raise ConfigError(f"{src}: key 'deepspeed.{key}' is '{getattr(ds, key)}', but distributed_backend is "
                                  f"'{cfg.distributed_backend}': offload is a DeepSpeed option (distributed_backend: "
                                  "deepspeed)")


def _need(ok: bool, src: str, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{src}: key '{key}' must be {rule}, got {value!r}")


def _range_pair(src: str, key: str, pair: tuple, lo_open: float, hi: Optional[float]) -> None:
    """(lo, hi) with lo_open < lo <= hi (<= hi when given)."""
    a, b = pair
    ok = lo_open < a <= b and (hi is None or b <= hi)
    rule = f"a pair with {lo_open:g} < lo <= hi" + (f" <= {hi:g}" if hi is not None else "")
    _need(ok, src, key, rule, list(pair))


def check_values(cfg: RunConfig, src: str) -> None:
    """Per-key value ranges (types and finiteness are checked when the config is built); ConfigError naming the key.

    A value a run could start with but that divides by zero, flips a gradient, never saves, or dies with a
    traceback later is refused here, with the key and the file.
    """
    s, o, d = cfg.student, cfg.optim, cfg.data
    base = STUDENT_PRESETS.get(s.arch, STUDENT_PRESETS["vit_s16"])  # non-ViT students ignore the ViT dims
    for name in ("patch_size", "embed_dim", "depth", "num_heads"):
        value = getattr(s, name)
        if value is not None:
            _need(value > 0, src, f"student.{name}", "> 0", value)
    width = s.embed_dim if s.embed_dim is not None else base.embed_dim
    heads = s.num_heads if s.num_heads is not None else base.num_heads
    if width % heads:
        where = "student.embed_dim" if s.embed_dim is not None else f"preset {s.arch}"
        raise ConfigError(f"{src}: key 'student.num_heads' ({heads}) must divide the width {width} ({where})")
    depth = s.depth if s.depth is not None else base.depth
    for i, b in enumerate(s.global_blocks):
        _need(0 <= b < depth, src, f"student.global_blocks.{i}", f"a block index in [0, {depth})", b)
    _need(s.cpe_grid > 0, src, "student.cpe_grid", "> 0", s.cpe_grid)
    _range_pair(src, "student.cpe_scale", s.cpe_scale, 0.0, 1.0)
    _range_pair(src, "student.cpe_ratio", s.cpe_ratio, 0.0, None)
    _need(s.num_registers >= 0, src, "student.num_registers", ">= 0", s.num_registers)
    _need(0 <= s.drop_path < 1, src, "student.drop_path", "in [0, 1)", s.drop_path)
    for t in cfg.teachers:
        key = f"teachers.{t.name}"
        if t.input_size is not None:
            _need(t.input_size > 0, src, f"{key}.input_size", "> 0", t.input_size)
        _need(t.summary_weight >= 0, src, f"{key}.summary_weight", ">= 0", t.summary_weight)
        _need(t.spatial_weight >= 0, src, f"{key}.spatial_weight", ">= 0", t.spatial_weight)
    _need(0 <= cfg.loss.adaloss_momentum < 1, src, "loss.adaloss_momentum", "in [0, 1)", cfg.loss.adaloss_momentum)
    _need(o.lr > 0, src, "optim.lr", "> 0", o.lr)
    for i, st in enumerate(cfg.stages):
        if st.lr is not None:
            _need(st.lr > 0, src, f"stages.{i}.lr", "> 0", st.lr)
    # 0 would zero every gradient (clip_grad_norm_ scales by max_norm / norm), a negative value flips them
    _need(o.grad_clip > 0, src, "optim.grad_clip", "> 0 (a large value such as 1e9 effectively disables clipping)",
          o.grad_clip)
    _need(o.weight_decay >= 0, src, "optim.weight_decay", ">= 0", o.weight_decay)
    for i, beta in enumerate(o.betas):
        _need(0 <= beta < 1, src, f"optim.betas.{i}", "in [0, 1)", beta)
    _need(o.eps > 0, src, "optim.eps", "> 0", o.eps)
    _need(0 <= o.min_lr_ratio <= 1, src, "optim.min_lr_ratio", "in [0, 1]", o.min_lr_ratio)
    _need(d.num_workers >= 0, src, "data.num_workers", ">= 0", d.num_workers)
    _need(d.shuffle_buffer >= 0, src, "data.shuffle_buffer", ">= 0", d.shuffle_buffer)
    _need(d.shards_per_chunk >= 1, src, "data.shards_per_chunk", ">= 1", d.shards_per_chunk)
    _need(d.bad_shard_warn_after >= 1, src, "data.bad_shard_warn_after", ">= 1", d.bad_shard_warn_after)
    _range_pair(src, "data.crop_scale", d.crop_scale, 0.0, 1.0)
    _range_pair(src, "data.crop_ratio", d.crop_ratio, 0.0, None)
    _need(cfg.checkpoint.every > 0, src, "checkpoint.every", "> 0", cfg.checkpoint.every)
    _need(cfg.checkpoint.keep > 0, src, "checkpoint.keep", "> 0", cfg.checkpoint.keep)
    _need(cfg.tracking.log_every > 0, src, "tracking.log_every", "> 0", cfg.tracking.log_every)
    m = cfg.monitor
    _need(m.straggler_ratio >= 1, src, "monitor.straggler_ratio", ">= 1", m.straggler_ratio)
    _need(m.nan_rollback_after >= 1, src, "monitor.nan_rollback_after", ">= 1", m.nan_rollback_after)
    _need(m.max_requeues >= 0, src, "monitor.max_requeues", ">= 0", m.max_requeues)
    for i, step in enumerate(m.inject_nan_steps):
        _need(step >= 1, src, f"monitor.inject_nan_steps.{i}", ">= 1", step)
    _need(cfg.eval.every >= 0, src, "eval.every", ">= 0 (0: never)", cfg.eval.every)
    _need(cfg.eval.knn_k >= 1, src, "eval.knn_k", ">= 1", cfg.eval.knn_k)
    _need(cfg.eval.knn_temperature > 0, src, "eval.knn_temperature", "> 0", cfg.eval.knn_temperature)
    # seeds feed numpy SeedSequence, which refuses negative entropy (a traceback at the first step otherwise)
    _need(cfg.seed >= 0, src, "seed", ">= 0", cfg.seed)


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


def _check_standardize(cfg: RunConfig, src: str) -> None:
    """loss.standardize=phi_s needs a Hadamard matrix of every teacher's feature widths."""
    if cfg.loss.standardize != "phi_s":
        return
    if cfg.loss.standardize_batches <= 0:
        raise ConfigError(f"{src}: key 'loss.standardize_batches' must be > 0, got {cfg.loss.standardize_batches}")
    from radio_scale.losses.phis import hadamard_order_supported
    from radio_scale.teachers.spec import teacher_spec

    for t in cfg.teachers:
        spec = teacher_spec(t)
        for kind, c in (("summary", spec.summary_dim if spec.has_summary else 0), ("spatial", spec.embed_dim)):
            if c and not hadamard_order_supported(c):
                raise ConfigError(f"{src}: key 'loss.standardize' is phi_s, but teacher '{t.name}' has {kind} width {c}, "
                                  "which has no Hadamard matrix here (orders 2^k x (q+1), q prime = 3 mod 4)")


def config_from_dict(raw: dict, src: str = "<dict>", for_training: bool = False) -> RunConfig:
    """Plain dict (e.g. from a checkpoint or export) -> validated RunConfig (see validate's for_training)."""
    cfg = build_config(raw, src)
    validate(cfg, src, for_training=for_training)
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

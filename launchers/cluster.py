"""Cluster configuration (`cluster_configs/*.yaml`): where and how the ranks of a run are started."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from radio_scale.config.loader import ConfigError, _build, read_yaml_file


@dataclass(frozen=True)
class ClusterConfig:
    """One cluster: `local` (processes on this machine, the default) or `slurm` (through submitit)."""

    name: str = "local"
    kind: Literal["local", "slurm"] = "local"
    tasks_per_node: int = 2  # ranks per node (= GPUs per node on a GPU cluster)
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_per_task_gb: Optional[float] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads_per_rank: Optional[int] = None  # torch intra-op threads per rank (CPU runs)
    time_limit_min: int = 60 * 24
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclusive: bool = False
    signal_delay_s: int = 120  # SLURM sends USR2 this long before the time limit
    max_requeues: int = 20
    setup: tuple[str, ...] = ()  # shell lines run before the ranks start (modules, containers, env)
    env: dict = field(default_factory=dict)
    run_root: str = "runs"
    mlflow_uri: Optional[str] = None  # overrides tracking.uri when set
    gpu_memory_gb: float = 80.0  # memory limit the planner plans against (-> the run's hardware.gpu_memory_gb)
    gpu_tflops: Optional[float] = None  # bf16 dense peak, for the planner's time estimates (-> hardware.gpu_tflops)
    # GB/s one rank all-gathers at across nodes (-> hardware.interconnect_gbps); None: the run config's
    interconnect_gbps: Optional[float] = None
    # SLURM: the interpreter the compute nodes run (after `setup`); None: the submitting machine's own
    python: Optional[str] = None


# A site's default cluster file, used when --cluster is not given.
CLUSTER_ENV = "RADIO_CLUSTER"


def cluster_source(path: Optional[str]) -> tuple[Optional[str], str]:
    """(the cluster file to use, where that choice came from): --cluster, else $RADIO_CLUSTER, else this machine."""
    if path:
        return path, "--cluster"
    env = os.environ.get(CLUSTER_ENV, "").strip()
    if env:
        return env, f"${CLUSTER_ENV}"
    return None, "default"


def load_cluster(path: Optional[str]) -> ClusterConfig:
    """A cluster YAML -> ClusterConfig (None: this machine); ConfigError names the bad key and file."""
    if path is None:
        return ClusterConfig()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"cluster config not found: {path}")
    raw = read_yaml_file(p, "cluster")
    if raw is None:
        raw = {}  # an empty cluster file: every default
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a cluster file must be a mapping of keys, got a {type(raw).__name__}")
    cfg = _build(ClusterConfig, raw, "", str(path))
    for key in ("tasks_per_node", "cpus_per_task", "time_limit_min"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{path}: key '{key}' must be > 0, got {getattr(cfg, key)}")
    if cfg.gpus_per_node < 0 or cfg.max_requeues < 0 or cfg.signal_delay_s < 0:
        raise ConfigError(f"{path}: keys 'gpus_per_node', 'max_requeues', 'signal_delay_s' must be >= 0")
    for key in ("gpu_memory_gb", "gpu_tflops", "mem_per_task_gb", "threads_per_rank", "interconnect_gbps"):
        value = getattr(cfg, key)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{path}: key '{key}' must be > 0, got {value}")
    if cfg.python is not None and not cfg.python.strip():
        raise ConfigError(f"{path}: key 'python' must be an interpreter path (or be left out), got {cfg.python!r}")
    if cfg.kind == "slurm" and cfg.gpus_per_node and cfg.gpus_per_node != cfg.tasks_per_node:
        raise ConfigError(f"{path}: key 'tasks_per_node' ({cfg.tasks_per_node}) must equal 'gpus_per_node' "
                          f"({cfg.gpus_per_node}): one rank per GPU")
    return cfg

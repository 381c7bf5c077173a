"""The rank plan: which teacher group every rank runs, with what batch, resolution and checkpointing.

`make_plan(cfg, world_size, stage_index)` is a pure function of the config and the world size (no
processes, no devices), so `radio-launch --dry-run` can plan the full recipe on a laptop. The device it
plans against is part of the config (`hardware.gpu_memory_gb` / `hardware.gpu_tflops`, which radio-launch
fills from the cluster file), so `plan_for_run(cfg, world_size, stage_index)` (= make_plan without
overrides) gives the same plan in the launcher (printed, written to plan.json) and on every rank. The
trainer calls it on every rank, checks it against the launcher's plan.json (`check_launch_plan`), then
`plan.build_process_groups()`.

Rank counts. Each group of a stage asks for `ranks`: an int (a count), a float (a fraction of the
world) or "auto". Fixed counts are served first, then fractions (largest remainder, at least one rank
each; when no group is "auto" the fractions share what is left in proportion), then the "auto" groups
split the rest. Ranks are contiguous blocks in config order. A stage with one group takes the whole
world. A count larger than the world size is an error naming `stages.N.groups.M.ranks` (never clamped).
A world with fewer ranks than the stage has groups (e.g. resuming a 2-group run on 1 process) places
several groups on one rank, which then computes each group's batch in turn every step: `groups_of(rank)`
lists them.

Planning ("auto"). When a group has `ranks: auto` or `allow_batch_tuning`, the planner also chooses,
for such groups, activation checkpointing (on/off) and, with `allow_batch_tuning`, the batch per rank
(between a quarter of and four times the recipe's). Objective, in this order:
1. every rank fits in `memory_limit_gb` (cost.py's memory model);
2. every group's share of the expected samples per step stays within ±share_tolerance (relative) of
   the recipe's share, where the recipe's share counts fixed groups at their counts and "auto" groups
   at an equal split of the remaining ranks, each at its recipe batch: the planner keeps the recipe's
   mix of teachers, while the total effective batch scales with the ranks given to each group
   (fixed groups keep ranks x batch exactly);
3. maximise goodput (the planned utilisation without the recompute of activation checkpointing, so
   checkpointing is only switched on where memory needs it); among plans within 0.005 of the best,
   take the smallest share deviation, then the batch closest to the recipe's.
If no plan satisfies 1 or 2, the closest one is returned with a warning (a dry-run should still print).

Teacher sharding. A teacher with `sharding: auto` is resolved by memory, per group: replicated (a bf16 copy
per rank, no communication) when the group fits the memory limit that way, else FSDP-sharded over the group,
the largest teacher first, until it fits. A sharded teacher all-gathers its encoder every forward
(cost.teacher_comm_bytes) at `hardware.interconnect_gbps`, overlapped with its compute: its time is the larger
of the two. The table prints which teachers are sharded and the bytes a rank all-gathers per step.

Time and utilisation: the step the ranks run. A rank's step FLOPs are batch x (student forward x 3, x 4 with
activation checkpointing, + every teacher's forward); the student's forward FLOPs are the one student FLOP model
(radio_scale.models.flops, checked against FlopCounterMode). Time = FLOPs / (device_tflops x mfu), a sharded
teacher's forward taking at least its communication time. Every rank uses the same attention window in a step
(one drawn per step from `student.window_sizes`), so the step time is computed *per window size*, as the
slowest rank under the coupling of the student's sharding, then averaged over the window sizes (and over which
groups are active, with sampling rates):
- world (`parallel.student_sharding: world`, FSDP2 over every rank): every rank all-gathers every student
  block together, so the first all-gather waits for the slowest group's teachers, and each block waits for the
  slowest group's student pass: step(w) = max over groups of the teachers' time + max over groups of the
  student's time at window w;
- hybrid (HSDP: sharded within node-aligned shard groups of `parallel.shard_group_size` ranks, default
  `hardware.ranks_per_node`, replicated across them; every group owns whole shard groups): groups meet only at
  the gradient all-reduce, so step(w) = max over groups of (teachers + student at window w).
Utilisation = Σ over ranks of busy time / (world size x step time), both averaged over windows (so a
perfectly balanced plan is 1.0); `utilisation_per_window` gives it for each window size, and `goodput` is the
same without the recompute of activation checkpointing. With `student_sharding: auto` the planner plans every
stage both ways and keeps hybrid when it is feasible on every stage (the world a whole number of shard groups,
each group a whole number of them), fits memory and raises the run's goodput (steps-weighted over stages) by
more than GOODPUT_TIE; the choice is made once per run, since the student is sharded once. Memory per rank
rises under hybrid: the student's fp32 state is sharded over the shard group, not the world.
"""
from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Optional

import numpy as np

from radio_scale.config.schema import GroupConfig, RunConfig, StageConfig
from radio_scale.distributed.cost import (
    BF16,
    DEFAULT_INTERCONNECT_GBPS,
    GB,
    RECOMPUTE_FORWARDS,
    RUNTIME_OVERHEAD_GB,
    STUDENT_TRAIN_FORWARDS,
    StudentCost,
    TeacherCost,
    head_loss_bytes,
    student_cost,
    teacher_comm_bytes,
    teacher_cost,
)

if TYPE_CHECKING:
    import torch.distributed as dist

# H100 SXM dense bf16 peak; the config's hardware.gpu_tflops (from the cluster file) overrides it.
DEFAULT_DEVICE_TFLOPS = 989.0
# Fraction of peak a ViT training step reaches; uniform across groups, so utilisation does not depend on it.
DEFAULT_MFU = 0.4
BATCH_TUNING_FACTOR = 4  # allow_batch_tuning: batch per rank within [recipe / 4, recipe x 4]
MAX_BATCH_CANDIDATES = 24
GOODPUT_TIE = 0.005  # plans this close in goodput are ranked by share and batch deviation
MAX_COMPOSITIONS = 200_000  # more rank splits than this are searched on a coarser grid


def group_active(seed: int, stage: int, step: int, group_name: str, rate: float) -> bool:
    """Whether a group with sampling rate `rate` contributes its batch on this step (same answer on every rank).

    Sampling rate r means: on each step the group is active with probability r, decided by a hash of
    (seed, stage index, step, group name), so every rank and every resume agrees without communication.
    An inactive group skips its teachers and runs the student on an empty batch, so it still enters every
    collective (SPMD) and adds nothing to the loss. Expected samples per step = Σ ranks x batch x rate.
    """
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    digest = hashlib.blake2b(f"{seed}/{stage}/{step}/{group_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < rate


@dataclass(frozen=True)
class GroupPlan:
    """One teacher group of a stage: its ranks, batch, resolution, costs and memory per rank."""

    name: str
    teachers: tuple[str, ...]
    ranks: tuple[int, ...]  # global rank ids
    batch_per_rank: int
    resolution: int
    sampling_rate: float
    activation_checkpointing: bool
    teacher_sharding: dict[str, str]  # teacher -> "fsdp" | "replicate" (resolved from the config)
    step_flops: float  # FLOPs of one rank on a step where the group is active (mean over window sizes)
    useful_flops: float  # the same without the recompute of activation checkpointing
    step_time_s: float  # step_flops / (device_tflops x mfu)
    memory_gb: float  # estimated peak per rank
    memory_breakdown_gb: dict[str, float]
    teacher_comm_gb: float = 0.0  # bytes a rank all-gathers per active step for its sharded teachers
    teacher_comm_s: float = 0.0  # their time at the planned interconnect bandwidth (overlapped with compute)

    @property
    def num_ranks(self) -> int:
        return len(self.ranks)

    @property
    def samples_per_step(self) -> int:
        """Samples on a step where the group is active."""
        return self.num_ranks * self.batch_per_rank

    @property
    def expected_samples(self) -> float:
        """Samples per step on average (ranks x batch x sampling rate)."""
        return self.samples_per_step * self.sampling_rate


@dataclass(frozen=True)
class RankPlan:
    """The plan of one stage at one world size: groups, their ranks, and the expected step cost."""

    stage_index: int
    stage_name: str
    world_size: int
    groups: tuple[GroupPlan, ...]
    step_time_s: float  # expected time of one step (the slowest active group)
    utilisation: float  # busy rank-time / (world size x step time)
    goodput: float  # utilisation without the recompute of activation checkpointing
    memory_limit_gb: float
    device_tflops: float
    mfu: float
    planned: bool  # the planner chose ranks, batch or checkpointing for some group
    warnings: tuple[str, ...] = field(default=())
    interconnect_gbps: float = DEFAULT_INTERCONNECT_GBPS
    student_sharding: str = "world"  # "world" (FSDP2 over all ranks) | "hybrid" (HSDP within shard groups)
    shard_group_size: int = 0  # ranks per student shard group (the world size under "world")
    utilisation_per_window: tuple[tuple[int, float], ...] = ()  # (window size, utilisation of such a step)

    @property
    def student_mesh_size(self) -> int:
        """The shard-group size the trainer gives shard_student: 0 (one world mesh) or the HSDP shard group."""
        return self.shard_group_size if self.student_sharding == "hybrid" else 0

    @property
    def effective_batch(self) -> float:
        """Expected samples per step over all groups (Σ ranks x batch x sampling rate)."""
        return sum(g.expected_samples for g in self.groups)

    @property
    def samples_per_second(self) -> float:
        return self.effective_batch / self.step_time_s if self.step_time_s > 0 else 0.0

    def group(self, name: str) -> GroupPlan:
        """The group called `name`."""
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"stage '{self.stage_name}' has no group '{name}' (groups: {', '.join(g.name for g in self.groups)})")

    def groups_of(self, rank: int) -> list[GroupPlan]:
        """Every group this rank computes (several only when the world is smaller than the number of groups)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size} ranks")
        return [g for g in self.groups if rank in g.ranks]

    def group_of(self, rank: int) -> GroupPlan:
        """The one group this rank computes."""
        mine = self.groups_of(rank)
        if len(mine) != 1:
            names = ", ".join(g.name for g in mine)
            raise ValueError(f"rank {rank} computes {len(mine)} groups ({names}) of stage '{self.stage_name}' "
                             f"at world size {self.world_size}: use groups_of")
        return mine[0]

    def build_process_groups(self, timeout_s: Optional[float] = None) -> dict[str, "dist.ProcessGroup"]:
        """One process subgroup per group, created in the same order on every rank; returns this rank's groups.

        timeout_s: the collective timeout of every subgroup (the run's `monitor.collective_timeout_s`). Without
        it `new_group` would not inherit the world's timeout but take the backend's default (10 min for NCCL),
        shorter than the watchdog's phase timeouts: NCCL would abort every rank before the watchdog could dump
        stacks and requeue.
        """
        import datetime

        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("build_process_groups needs an initialised torch.distributed process group")
        if dist.get_world_size() != self.world_size:
            raise RuntimeError(f"plan of stage '{self.stage_name}' is for {self.world_size} ranks, "
                               f"the process group has {dist.get_world_size()}")
        me = dist.get_rank()
        timeout = None if timeout_s is None else datetime.timedelta(seconds=float(timeout_s))
        mine = {}
        for g in self.groups:  # every rank must call new_group for every group, in the same order
            pg = dist.new_group(list(g.ranks), timeout=timeout)
            if me in g.ranks:
                mine[g.name] = pg
        return mine

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (the launcher writes it to plan.json)."""
        return {
            "stage": self.stage_name,
            "stage_index": self.stage_index,
            "world_size": self.world_size,
            "effective_batch": self.effective_batch,
            "step_time_s": self.step_time_s,
            "samples_per_second": self.samples_per_second,
            "utilisation": self.utilisation,
            "goodput": self.goodput,
            "utilisation_per_window": {str(w): u for w, u in self.utilisation_per_window},
            "student_sharding": self.student_sharding,
            "shard_group_size": self.shard_group_size,
            "memory_limit_gb": self.memory_limit_gb,
            "device_tflops": self.device_tflops,
            "interconnect_gbps": self.interconnect_gbps,
            "mfu": self.mfu,
            "planned": self.planned,
            "warnings": list(self.warnings),
            "groups": [
                {
                    "name": g.name,
                    "teachers": list(g.teachers),
                    "ranks": list(g.ranks),
                    "num_ranks": g.num_ranks,
                    "batch_per_rank": g.batch_per_rank,
                    "resolution": g.resolution,
                    "sampling_rate": g.sampling_rate,
                    "activation_checkpointing": g.activation_checkpointing,
                    "teacher_sharding": dict(g.teacher_sharding),
                    "teacher_comm_gb": g.teacher_comm_gb,
                    "teacher_comm_s": g.teacher_comm_s,
                    "step_tflops": g.step_flops / 1e12,
                    "useful_tflops": g.useful_flops / 1e12,
                    "step_time_s": g.step_time_s,
                    "memory_gb": g.memory_gb,
                    "memory_breakdown_gb": dict(g.memory_breakdown_gb),
                    "samples_per_step": g.samples_per_step,
                    "expected_samples": g.expected_samples,
                }
                for g in self.groups
            ],
        }

    def table(self) -> str:
        """A plain-text table of the plan (what `radio-launch --dry-run` prints)."""
        head = ["group", "ranks", "n", "batch", "res", "rate", "AC", "TFLOP/rank", "step ms", "mem GB", "samples",
                "gather GB", "teachers (F: FSDP-sharded, R: replicated)"]
        rows = [head]
        for g in self.groups:
            over = " !" if g.memory_gb > self.memory_limit_gb else ""
            rows.append([g.name, _rank_span(g.ranks), str(g.num_ranks), str(g.batch_per_rank), str(g.resolution),
                         f"{g.sampling_rate:.2f}", "on" if g.activation_checkpointing else "off",
                         f"{g.step_flops / 1e12:.4g}", f"{g.step_time_s * 1e3:.4g}", f"{g.memory_gb:.1f}{over}",
                         f"{g.expected_samples:g}", f"{g.teacher_comm_gb:.3g}",
                         ",".join(f"{t}:{'F' if g.teacher_sharding.get(t) == 'fsdp' else 'R'}" for t in g.teachers)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.append(
            f"{self.world_size} ranks ({'planned' if self.planned else 'as configured'}): effective batch "
            f"{self.effective_batch:g}, step {self.step_time_s * 1e3:.4g} ms, {self.samples_per_second:.4g} samples/s, "
            f"utilisation {self.utilisation:.3f} (goodput {self.goodput:.3f}; per window "
            + ", ".join(f"{w or 'global'}: {u:.3f}" for w, u in self.utilisation_per_window) + ")"
        )
        lines.append(f"student sharding: {self.student_sharding} "
                     + (f"(HSDP: shard groups of {self.shard_group_size} ranks, replicated "
                        f"{self.world_size // max(self.shard_group_size, 1)}x)" if self.student_sharding == "hybrid"
                        else "(FSDP2 over all ranks: groups wait for each other at every block)"))
        lines.append(f"assumes {self.device_tflops:g} TFLOPS x {self.mfu:g} MFU per rank, "
                     f"{self.memory_limit_gb:g} GB memory limit, {self.interconnect_gbps:g} GB/s all-gather "
                     "bandwidth for sharded teachers")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _rank_span(ranks: tuple[int, ...]) -> str:
    if len(ranks) > 1 and list(ranks) == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


# ---------------------------------------------------------------------------------------------- rank counts


def _apportion(weights: list[float], total: int) -> list[int]:
    """Integers >= 1 proportional to weights and summing to total (largest remainder)."""
    s = sum(weights)
    quotas = [w / s * total for w in weights]
    counts = [max(1, math.floor(q)) for q in quotas]
    while sum(counts) > total:  # minimums pushed the sum over: take from the most over-served
        i = max((i for i, c in enumerate(counts) if c > 1), key=lambda i: counts[i] - quotas[i])
        counts[i] -= 1
    while sum(counts) < total:
        i = max(range(len(counts)), key=lambda i: quotas[i] - counts[i])
        counts[i] += 1
    return counts


def _fixed_counts(stage: StageConfig, world_size: int) -> list[Optional[int]]:
    """Rank counts of the int and fraction groups (None for "auto" ones); ValueError when they cannot fit."""
    groups = stage.groups
    where = f"stage '{stage.name}'"
    if len(groups) == 1:
        return [world_size]
    counts: list[Optional[int]] = [None] * len(groups)
    kinds = [_rank_kind(g) for g in groups]
    fixed = sum(g.ranks for g, k in zip(groups, kinds) if k == "count")
    fracs = [i for i, k in enumerate(kinds) if k == "fraction"]
    autos = [i for i, k in enumerate(kinds) if k == "auto"]
    for i, k in enumerate(kinds):
        if k == "count":
            counts[i] = groups[i].ranks
    rest = world_size - fixed
    total_fraction = sum(groups[i].ranks for i in fracs)
    if total_fraction > 1 + 1e-9:
        names = ", ".join(f"{groups[i].name}={groups[i].ranks:g}" for i in fracs)
        raise ValueError(f"{where}: rank fractions {names} add up to {total_fraction:g}, more than the whole world")
    if not fracs and not autos:
        if fixed != world_size:
            parts = " + ".join(f"{g.name}={g.ranks}" for g in groups)
            raise ValueError(f"{where}: group rank counts {parts} = {fixed} do not match world size {world_size}")
        return counts
    need = len(fracs) + len(autos)
    if rest < need:
        starved = groups[sorted(fracs + autos)[max(0, rest)]].name
        raise ValueError(f"{where}: group '{starved}' gets no rank: fixed counts take {fixed} of world size {world_size}")
    if fracs:
        if autos:
            want = round(total_fraction * world_size)
            total = min(max(want, len(fracs)), rest - len(autos))
        else:
            total = rest
        for i, c in zip(fracs, _apportion([groups[i].ranks for i in fracs], total)):
            counts[i] = c
    return counts


def check_rank_counts(stage: StageConfig, stage_index: int, world_size: int) -> None:
    """A group that asks for more ranks (a count) than the world has is an error, never silently clamped."""
    for j, g in enumerate(stage.groups):
        if _rank_kind(g) == "count" and g.ranks > world_size:
            raise ValueError(f"key 'stages.{stage_index}.groups.{j}.ranks' asks for {g.ranks} ranks (group '{g.name}' "
                             f"of stage '{stage.name}'), more than the world size {world_size}")


def _rank_kind(g: GroupConfig) -> str:
    if isinstance(g.ranks, str):
        if g.ranks != "auto":
            raise ValueError(f"group '{g.name}': ranks must be a count, a fraction or 'auto', got {g.ranks!r}")
        return "auto"
    if isinstance(g.ranks, bool) or g.ranks <= 0:
        raise ValueError(f"group '{g.name}': ranks must be > 0, got {g.ranks!r}")
    return "count" if isinstance(g.ranks, int) else "fraction"


def _compositions(total: int, parts: int) -> np.ndarray:
    """Every split of `total` into `parts` positive integers (on a coarser grid when there are too many)."""
    if parts == 0:
        return np.zeros((1, 0), dtype=np.int64)
    if parts == 1:
        return np.array([[total]], dtype=np.int64)
    step = 1
    while math.comb((total - 1) // step, parts - 1) > MAX_COMPOSITIONS:
        step += 1
    cuts = range(step, total, step) if step > 1 else range(1, total)
    rows = []
    for c in itertools.combinations(cuts, parts - 1):
        edges = (0, *c, total)
        rows.append([b - a for a, b in zip(edges, edges[1:])])
    return np.array(rows, dtype=np.int64).reshape(-1, parts)


# ---------------------------------------------------------------------------------------------- costs


@dataclass(frozen=True)
class _Option:
    """One way to run a group: its batch and checkpointing, with per-window costs and memory parts."""

    batch: int
    checkpointing: bool
    teacher_s: float  # teachers' forward time per step
    student_s: tuple[float, ...]  # student time per step, per window size
    useful_student_s: tuple[float, ...]  # without recompute
    mem_fixed: float  # bytes that do not depend on the group's rank count
    mem_sharded: float  # teacher bytes divided by the group's rank count
    mem_parts: dict
    sharding: dict = field(default_factory=dict)  # teacher -> "fsdp" | "replicate"
    comm_s: float = 0.0  # all-gather time of the sharded teachers per active step (upper bound: (n-1)/n ~ 1)
    teacher_compute_s: float = 0.0  # teachers' forward compute alone (teacher_s minus communication not hidden)

    @property
    def compute_s(self) -> float:
        """Compute time alone (FLOPs / rate), without communication that compute does not hide."""
        return self.teacher_compute_s + float(np.mean(self.student_s))

    @property
    def useful_compute_s(self) -> float:
        return self.teacher_compute_s + float(np.mean(self.useful_student_s))

    @property
    def time_s(self) -> float:
        return self.teacher_s + float(np.mean(self.student_s))

    @property
    def useful_s(self) -> float:
        return self.teacher_s + float(np.mean(self.useful_student_s))

    def memory(self, n_ranks) -> np.ndarray:
        return self.mem_fixed + self.mem_sharded / np.asarray(n_ranks, dtype=np.float64)


@dataclass(frozen=True)
class _GroupModel:
    cfg: GroupConfig
    teachers: tuple[TeacherCost, ...]
    sharding: dict[str, str]  # the configured mode per teacher: "auto" | "replicate" | "fsdp"
    tunable: bool

    def sharding_variants(self) -> list[dict[str, str]]:
        """Ways to resolve the "auto" teachers, cheapest in communication first: all replicated, then the largest
        one sharded, the two largest, ... (a teacher sharded only when memory needs it: see `options`)."""
        auto = sorted((t for t in self.teachers if self.sharding[t.name] == "auto"), key=lambda t: -t.params)
        fixed = {k: v for k, v in self.sharding.items() if v != "auto"}
        return [{**fixed, **{t.name: ("fsdp" if i < k else "replicate") for i, t in enumerate(auto)}}
                for k in range(len(auto) + 1)]


def _option(gm: _GroupModel, student: StudentCost, batch: int, ac: bool, world_size: int, windows: tuple[int, ...],
            flops_per_s: float, colocated: tuple[TeacherCost, ...] = (), sharding: Optional[dict] = None,
            bytes_per_s: float = DEFAULT_INTERCONNECT_GBPS * 1e9, zero_stage: int = 3) -> _Option:
    res = gm.cfg.resolution
    sharding = dict(gm.sharding if sharding is None else sharding)
    fwd = [student.forward_flops(res, w) for w in windows]
    k = STUDENT_TRAIN_FORWARDS + (RECOMPUTE_FORWARDS if ac else 0)
    fsdp = [t for t in gm.teachers if sharding[t.name] == "fsdp"]
    # a sharded teacher's forward takes at least its all-gather (prefetched: overlapped with its compute)
    comm = {t.name: teacher_comm_bytes(t, 2**30) / bytes_per_s for t in fsdp}
    teacher_s = sum(max(batch * t.forward_flops / flops_per_s, comm.get(t.name, 0.0)) for t in gm.teachers)
    sharded = sum(BF16 * t.sharded_params for t in fsdp)
    # blocks in flight + the encoder's root, and what the forward never runs (text tower, decoder), whole
    gathered = sum(BF16 * (t.gathered_params + t.params - t.sharded_params) for t in fsdp)
    replicated = sum(BF16 * t.params for t in gm.teachers if sharding[t.name] != "fsdp")
    replicated += sum(BF16 * t.params for t in colocated)
    parts = {
        "student_states": student.state_bytes(world_size, zero_stage),  # world_size: the student's shard group
        "student_activations": batch * student.activation_bytes(res, ac, windows) + student.spectral_bytes(ac),
        "heads_and_losses": batch * sum(head_loss_bytes(student.arch, res, t) for t in gm.teachers),
        "teacher_params": replicated + gathered,
        "teacher_activations": batch * max(t.working_bytes for t in gm.teachers),
        "runtime_overhead": RUNTIME_OVERHEAD_GB * GB,
    }
    return _Option(
        batch=batch,
        checkpointing=ac,
        teacher_s=teacher_s,
        student_s=tuple(batch * k * f / flops_per_s for f in fwd),
        useful_student_s=tuple(batch * STUDENT_TRAIN_FORWARDS * f / flops_per_s for f in fwd),
        mem_fixed=sum(parts.values()),
        mem_sharded=sharded,
        mem_parts=parts,
        sharding=sharding,
        comm_s=sum(comm.values()),
        teacher_compute_s=batch * sum(t.forward_flops for t in gm.teachers) / flops_per_s,
    )


def _batch_candidates(g: GroupConfig) -> list[int]:
    if not g.allow_batch_tuning:
        return [g.batch_per_rank]
    lo, hi = max(1, math.ceil(g.batch_per_rank / BATCH_TUNING_FACTOR)), g.batch_per_rank * BATCH_TUNING_FACTOR
    if hi - lo + 1 <= MAX_BATCH_CANDIDATES:
        return list(range(lo, hi + 1))
    geo = np.unique(np.round(np.geomspace(lo, hi, MAX_BATCH_CANDIDATES)).astype(int))
    return sorted(set(geo.tolist()) | {g.batch_per_rank})


def _active_sets(rates: list[float]) -> list[tuple[float, tuple[bool, ...]]]:
    """(probability, which groups are active) for every combination of the groups' independent draws."""
    sets = []
    for mask in itertools.product((True, False), repeat=len(rates)):
        p = math.prod(r if on else 1.0 - r for r, on in zip(rates, mask))
        if p > 0:
            sets.append((p, mask))
    return sets


def _window_step_times(classes: list[list[tuple[int, _Option]]], rates: list[float], coupling: str) -> list[float]:
    """Expected step time per window size: the slowest rank under the sharding's coupling, over which groups are
    active (module docstring). classes: for each distinct kind of rank, the (group index, option) it computes in
    turn."""
    n_w = len(classes[0][0][1].student_s)
    out = []
    for w in range(n_w):
        total = 0.0
        for p, mask in _active_sets(rates):
            teach = [sum(o.teacher_s for gi, o in cls if mask[gi]) for cls in classes]
            stud = [sum(o.student_s[w] for gi, o in cls if mask[gi]) for cls in classes]
            if coupling == "hybrid":
                slowest = max(t + st for t, st in zip(teach, stud))
            else:  # one world mesh: the teachers' slowest, then every block at the slowest group's pace
                slowest = max(teach) + max(stud)
            total += p * slowest
        out.append(total)
    return out


def _step_time(classes: list[list[tuple[int, _Option]]], rates: list[float], coupling: str) -> float:
    """Expected step time, averaged over the window sizes (drawn uniformly per step)."""
    return float(np.mean(_window_step_times(classes, rates, coupling)))


def _busy_per_window(classes, class_sizes, rates, useful: bool = False) -> list[float]:
    """Σ over ranks of busy time per step, per window size."""
    n_w = len(classes[0][0][1].student_s)
    return [sum(n * sum(rates[gi] * (o.teacher_s + (o.useful_student_s if useful else o.student_s)[w])
                        for gi, o in cls) for n, cls in zip(class_sizes, classes)) for w in range(n_w)]


# ---------------------------------------------------------------------------------------------- planning


def shard_group_size(cfg: RunConfig) -> int:
    """Ranks per student shard group under hybrid sharding: parallel.shard_group_size, else one node's ranks."""
    return cfg.parallel.shard_group_size or cfg.hardware.ranks_per_node


def hybrid_infeasible(cfg: RunConfig, world_size: int) -> Optional[str]:
    """Why hybrid sharding cannot run this config at this world size (None: it can, on every stage)."""
    size = shard_group_size(cfg)
    if size <= 1 or size >= world_size:
        return (f"the shard group ({size} ranks: parallel.shard_group_size / hardware.ranks_per_node) must be "
                f"larger than 1 and smaller than the world size {world_size}")
    if world_size % size:
        return f"world size {world_size} is not a multiple of the shard group size {size}"
    units = world_size // size
    for i, stage in enumerate(cfg.stages):
        if len(stage.groups) > units:
            return (f"stage '{stage.name}' has {len(stage.groups)} groups, more than the {units} shard groups of "
                    f"{size} ranks")
        for j, g in enumerate(stage.groups):
            if _rank_kind(g) == "count" and len(stage.groups) > 1 and g.ranks % size:
                return (f"key 'stages.{i}.groups.{j}.ranks' is {g.ranks}, not a multiple of the shard group size "
                        f"{size}: every group must own whole shard groups")
    return None


_SHARDING_CACHE: dict = {}


def run_student_sharding(cfg: RunConfig, world_size: int) -> str:
    """The run's student sharding, "world" or "hybrid" (one for every stage: the student is sharded once).

    `parallel.student_sharding` world/hybrid is taken as asked (hybrid that cannot run is a ValueError naming
    the key; a shard group as large as the world is world FSDP); auto: module docstring.
    """
    mode = cfg.parallel.student_sharding
    if mode == "world" or cfg.distributed_backend != "fsdp2":  # HSDP is FSDP2's (validated in the config)
        return "world"
    why = hybrid_infeasible(cfg, world_size)
    if mode == "hybrid":
        if why is None:
            return "hybrid"
        if shard_group_size(cfg) >= world_size:
            return "world"  # one shard group is the whole world: that is world FSDP
        raise ValueError(f"key 'parallel.student_sharding' is 'hybrid', but {why}")
    if why is not None:
        return "world"
    key = (repr(cfg), world_size)
    if key not in _SHARDING_CACHE:
        score = {}
        for m in ("world", "hybrid"):
            plans = [make_plan(cfg, world_size, i, student_sharding=m) for i in range(len(cfg.stages))]
            fits = all(g.memory_gb <= p.memory_limit_gb for p in plans for g in p.groups)
            steps = np.array([max(s.steps, 1) for s in cfg.stages], dtype=np.float64)
            score[m] = (fits, float(np.dot(steps, [p.goodput for p in plans]) / steps.sum()))
        better = score["hybrid"][0] and score["hybrid"][1] > score["world"][1] + GOODPUT_TIE
        _SHARDING_CACHE[key] = "hybrid" if better or not score["world"][0] and score["hybrid"][0] else "world"
    return _SHARDING_CACHE[key]


def make_plan(cfg: RunConfig, world_size: int, stage_index: int, *, memory_limit_gb: Optional[float] = None,
              device_tflops: Optional[float] = None, mfu: float = DEFAULT_MFU,
              share_tolerance: float = 0.25, interconnect_gbps: Optional[float] = None,
              student_sharding: Optional[str] = None) -> RankPlan:
    """Plan stage `stage_index` of `cfg` on `world_size` ranks (see the module docstring for the rules).

    memory_limit_gb / device_tflops default to the run's `cfg.hardware` (device_tflops then to the H100
    figure when that is unset); pass them only to explore other hardware (benchmarks, tests).
    student_sharding: "world" or "hybrid" to plan under that sharding (benchmarks, and the auto choice);
    None: the run's (run_student_sharding).
    """
    if student_sharding is None:
        student_sharding = run_student_sharding(cfg, world_size)
    if student_sharding not in ("world", "hybrid"):
        raise ValueError(f"student_sharding must be 'world' or 'hybrid', got {student_sharding!r}")
    if student_sharding == "hybrid":
        why = hybrid_infeasible(cfg, world_size)
        if why is not None:
            raise ValueError(f"key 'parallel.student_sharding' is 'hybrid', but {why}")
    unit = shard_group_size(cfg) if student_sharding == "hybrid" else 1
    state_shards = unit if student_sharding == "hybrid" else world_size
    # the student's state per rank: FSDP2 and ZeRO-3 shard everything, ZeRO-1/2 keep bf16 params (and grads) whole
    zero_stage = cfg.deepspeed.zero_stage if cfg.distributed_backend == "deepspeed" else 3
    if memory_limit_gb is None:
        memory_limit_gb = cfg.hardware.gpu_memory_gb
    if device_tflops is None:
        device_tflops = cfg.hardware.gpu_tflops
    if interconnect_gbps is None:
        interconnect_gbps = getattr(cfg.hardware, "interconnect_gbps", DEFAULT_INTERCONNECT_GBPS)
    if not interconnect_gbps > 0:
        raise ValueError(f"interconnect_gbps must be > 0, got {interconnect_gbps}")
    bytes_per_s = interconnect_gbps * 1e9
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if not 0 <= stage_index < len(cfg.stages):
        raise ValueError(f"stage index {stage_index} is out of range: the run has {len(cfg.stages)} stages")
    stage = cfg.stages[stage_index]
    check_rank_counts(stage, stage_index, world_size)
    tflops = DEFAULT_DEVICE_TFLOPS if device_tflops is None else device_tflops
    if tflops <= 0 or not 0 < mfu <= 1:
        raise ValueError(f"device_tflops must be > 0 and mfu in (0, 1], got {tflops} and {mfu}")
    if memory_limit_gb <= 0 or share_tolerance < 0:
        raise ValueError(f"memory_limit_gb must be > 0 and share_tolerance >= 0, got {memory_limit_gb} and {share_tolerance}")
    flops_per_s = tflops * 1e12 * mfu
    limit = memory_limit_gb * GB
    windows = tuple(cfg.student.window_sizes) or (0,)
    student = student_cost(cfg)
    costs = {t.name: teacher_cost(t) for t in cfg.teachers}
    models = []
    for g in stage.groups:
        missing = [t for t in g.teachers if t not in costs]
        if missing:
            raise ValueError(f"stage '{stage.name}': group '{g.name}' names undeclared teacher '{missing[0]}'")
        ts = tuple(costs[t] for t in g.teachers)
        models.append(_GroupModel(g, ts, {t.name: cfg.teacher(t.name).sharding for t in ts},
                                  tunable=g.ranks == "auto" or g.allow_batch_tuning))
    rates = [g.sampling_rate for g in stage.groups]
    ac_default = cfg.student.activation_checkpointing
    warnings: list[str] = []

    def options(gm: _GroupModel, colocated=()) -> list[_Option]:
        acs = (False, True) if gm.tunable else (ac_default,)
        opts = []
        variants = gm.sharding_variants()
        for b in _batch_candidates(gm.cfg) if gm.tunable else [gm.cfg.batch_per_rank]:
            per_ac = []
            for ac in acs:
                here = [_option(gm, student, b, ac, state_shards, windows, flops_per_s, colocated, v, bytes_per_s,
                                zero_stage)
                        for v in variants]
                # sharding costs communication for the same work: an "auto" teacher is sharded only where the
                # group does not fit with it replicated (replicated memory does not depend on the rank count)
                if here[0].memory(1) <= limit:
                    here = here[:1]
                per_ac.append(here)
            # checkpointing costs time for the same samples: keep it only where the plain option may not fit
            if len(per_ac) == 2 and any(o.memory(1) <= limit for o in per_ac[0]):
                per_ac = per_ac[:1]
            opts.extend(o for here in per_ac for o in here)
        return opts

    # ranks that compute the same groups take the same time: one "class" per distinct set of groups
    if len(models) > 1 and world_size < len(models):
        chosen, ranks = _place_shared(models, options, world_size, limit)
        classes = [[(i, chosen[i]) for i in range(len(models)) if ranks[i] == r] for r in sorted(set(ranks))]
        class_sizes = [1] * len(classes)
    else:
        chosen, ranks = _place_partitioned(stage, models, options, world_size, rates, limit, share_tolerance,
                                           warnings, unit, student_sharding)
        classes, class_sizes = [[(i, o)] for i, o in enumerate(chosen)], [len(r) for r in ranks]

    per_window = _window_step_times(classes, rates, student_sharding)
    step = float(np.mean(per_window))
    busy_w = _busy_per_window(classes, class_sizes, rates)
    busy = float(np.mean(busy_w))
    useful = float(np.mean(_busy_per_window(classes, class_sizes, rates, useful=True)))
    groups = []
    for i, (gm, opt) in enumerate(zip(models, chosen)):
        mem = float(opt.memory(len(ranks[i])))
        parts = {k: v / GB for k, v in opt.mem_parts.items()}
        parts["teacher_params"] += opt.mem_sharded / len(ranks[i]) / GB
        if mem > limit:
            warnings.append(f"group '{gm.cfg.name}' needs {mem / GB:.1f} GB per rank, over the {memory_limit_gb:g} GB limit")
        comm_bytes = sum(teacher_comm_bytes(t, len(ranks[i])) for t in gm.teachers if opt.sharding[t.name] == "fsdp")
        groups.append(GroupPlan(
            name=gm.cfg.name, teachers=tuple(gm.cfg.teachers), ranks=ranks[i], batch_per_rank=opt.batch,
            resolution=gm.cfg.resolution, sampling_rate=gm.cfg.sampling_rate,
            activation_checkpointing=opt.checkpointing, teacher_sharding=dict(opt.sharding),
            step_flops=opt.compute_s * flops_per_s, useful_flops=opt.useful_compute_s * flops_per_s,
            step_time_s=opt.time_s, memory_gb=mem / GB, memory_breakdown_gb=parts,
            teacher_comm_gb=comm_bytes / GB, teacher_comm_s=comm_bytes / bytes_per_s,
        ))
    return RankPlan(
        stage_index=stage_index, stage_name=stage.name, world_size=world_size, groups=tuple(groups),
        step_time_s=step, utilisation=busy / (world_size * step) if step > 0 else 0.0,
        goodput=useful / (world_size * step) if step > 0 else 0.0,
        memory_limit_gb=memory_limit_gb, device_tflops=tflops, mfu=mfu,
        planned=any(gm.tunable for gm in models), warnings=tuple(warnings), interconnect_gbps=interconnect_gbps,
        student_sharding=student_sharding, shard_group_size=unit if student_sharding == "hybrid" else world_size,
        utilisation_per_window=tuple((w, b / (world_size * t) if t > 0 else 0.0)
                                     for w, b, t in zip(windows, busy_w, per_window)),
    )


def plan_for_run(cfg: RunConfig, world_size: int, stage_index: int) -> RankPlan:
    """The plan a run executes: stage `stage_index` at `world_size` on the run's own `cfg.hardware`.

    The one function radio-launch (--dry-run, plan.json), the ranks (stage.build_stage) and the MLflow tags
    use, so all of them see the same plan.
    """
    return make_plan(cfg, world_size, stage_index, memory_limit_gb=cfg.hardware.gpu_memory_gb,
                     device_tflops=cfg.hardware.gpu_tflops)


# What a rank executes from its group plan; these must equal the launch plan's, field by field.
_CHECKED_STAGE_FIELDS = ("world_size", "stage", "memory_limit_gb", "device_tflops", "student_sharding",
                         "shard_group_size")
_CHECKED_GROUP_FIELDS = ("teachers", "ranks", "batch_per_rank", "resolution", "sampling_rate",
                         "activation_checkpointing", "teacher_sharding")


def check_launch_plan(plan: RankPlan, run_dir) -> None:
    """Refuse to run a plan that differs from the one the launcher printed and wrote to <run_dir>/plan.json.

    No plan.json (a rank started without radio-launch): nothing to check. Otherwise a RuntimeError (one line)
    names the stage, the group, the field, both values and the file.
    """
    import json
    from pathlib import Path

    if run_dir is None:
        return
    path = Path(run_dir) / "plan.json"
    if not path.is_file():
        return
    where = f"stage '{plan.stage_name}'"
    tail = f"the launch plan {path}; relaunch with radio-launch to plan again"
    try:
        launched = json.loads(path.read_text())
        stages = launched["stages"]
        entry = next(s for i, s in enumerate(stages) if s.get("stage_index", i) == plan.stage_index)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration):
        raise RuntimeError(f"{where}: no readable plan of this stage in {tail}") from None
    mine = json.loads(json.dumps(plan.to_dict(), default=str))  # the same JSON types plan.json holds

    def differ(a, b) -> bool:
        if isinstance(a, float) or isinstance(b, float):
            return not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9))
        return a != b

    for key in _CHECKED_STAGE_FIELDS:
        if differ(mine.get(key), entry.get(key)):
            raise RuntimeError(f"{where}: field '{key}' is {mine.get(key)!r} on this rank but {entry.get(key)!r} in {tail}")
    theirs = {g.get("name"): g for g in entry.get("groups", []) if isinstance(g, dict)}
    names = [g["name"] for g in mine["groups"]]
    if names != list(theirs):
        raise RuntimeError(f"{where}: groups are {names} on this rank but {list(theirs)} in {tail}")
    for g in mine["groups"]:
        for key in _CHECKED_GROUP_FIELDS:
            if differ(g.get(key), theirs[g["name"]].get(key)):
                raise RuntimeError(f"{where} group '{g['name']}': field '{key}' is {g.get(key)!r} on this rank but "
                                   f"{theirs[g['name']].get(key)!r} in {tail}")


def _place_shared(models: list[_GroupModel], options, world_size: int,
                  limit: float) -> tuple[list[_Option], list[tuple[int, ...]]]:
    """Fewer ranks than groups: group i on rank floor(i x world / groups), co-located groups run in turn."""
    placement = [i * world_size // len(models) for i in range(len(models))]
    chosen = []
    for i, gm in enumerate(models):
        own = set(gm.cfg.teachers)
        # the rank also holds its other groups' teachers (each teacher once)
        others = tuple({t.name: t for j, o in enumerate(models) if j != i and placement[j] == placement[i]
                        for t in o.teachers if t.name not in own}.values())
        opts = options(gm, others)
        opts = [o for o in opts if o.batch == gm.cfg.batch_per_rank] or opts
        fits = [o for o in opts if o.memory(1) <= limit]
        chosen.append(fits[0] if fits else min(opts, key=lambda o: float(o.memory(1))))
    return chosen, [(r,) for r in placement]


def _place_partitioned(stage: StageConfig, models: list[_GroupModel], options, world_size: int, rates: list[float],
                       limit: float, tolerance: float, warnings: list[str], unit: int = 1,
                       coupling: str = "world") -> tuple[list[_Option], list[tuple[int, ...]]]:
    """Disjoint contiguous rank blocks: fixed counts as configured, the rest searched (module docstring).

    unit > 1 (hybrid sharding): counts are whole shard groups of `unit` ranks (a stage of one group: the world).
    """
    if unit > 1 and len(models) > 1:
        units = replace(stage, groups=tuple(replace(g, ranks=g.ranks // unit) if _rank_kind(g) == "count" else g
                                            for g in stage.groups))
        fixed = [None if c is None else c * unit for c in _fixed_counts(units, world_size // unit)]
    else:
        unit = 1
        fixed = _fixed_counts(stage, world_size)
    auto_idx = [i for i, c in enumerate(fixed) if c is None]
    remaining = world_size - sum(c for c in fixed if c is not None)
    comps = _compositions(remaining // unit, len(auto_idx)) * unit
    all_counts = np.zeros((len(comps), len(models)), dtype=np.int64)
    for i, c in enumerate(fixed):
        if c is not None:
            all_counts[:, i] = c
    for j, i in enumerate(auto_idx):
        all_counts[:, i] = comps[:, j]
    # the recipe's intent: fixed groups at their counts, "auto" ones at an equal split, each at its batch
    nominal = np.array([c if c is not None else remaining / len(auto_idx) for c in fixed], dtype=np.float64)
    target = nominal * np.array([g.batch_per_rank * g.sampling_rate for g in stage.groups])
    recipe_batch = np.array([g.batch_per_rank for g in stage.groups], dtype=np.float64)
    chosen, counts = _search([options(gm) for gm in models], all_counts, target / target.sum(), recipe_batch, rates,
                             limit, tolerance, world_size, warnings, coupling)
    starts = np.concatenate([[0], np.cumsum(counts)])
    return chosen, [tuple(range(int(starts[i]), int(starts[i + 1]))) for i in range(len(models))]


def _search(options: list[list[_Option]], counts: np.ndarray, target: np.ndarray,
            recipe_batch: np.ndarray, rates: list[float], limit: float, tolerance: float, world_size: int,
            warnings: list[str], coupling: str = "world") -> tuple[list[_Option], list[int]]:
    """The best (option per group, rank counts) by the objective of the module docstring."""
    rate = np.array(rates)
    rows = []  # per option combination: arrays over the rank splits
    for combo in itertools.product(*options):
        step = _step_time([[(i, o)] for i, o in enumerate(combo)], rates, coupling)
        useful = counts @ (rate * np.array([o.useful_s for o in combo]))
        samples = counts * (rate * np.array([o.batch for o in combo]))
        share = samples / samples.sum(axis=1, keepdims=True)
        excess = np.max(np.stack([o.memory(counts[:, i]) for i, o in enumerate(combo)], axis=1), axis=1) - limit
        rows.append({
            "combo": combo,
            "goodput": useful / (world_size * step),
            "deviation": np.max(np.abs(share / target - 1.0), axis=1),
            "excess": excess,
            "batch_dev": np.full(len(counts), sum(abs(math.log(o.batch / b)) for o, b in zip(combo, recipe_batch))),
        })
    keys = ("goodput", "deviation", "excess", "batch_dev")
    flat = {k: np.concatenate([r[k] for r in rows]) for k in keys}
    which = np.concatenate([np.full(len(counts), i) for i in range(len(rows))])
    split = np.tile(np.arange(len(counts)), len(rows))
    keep = np.ones(len(which), dtype=bool)
    if not (flat["excess"] <= 0).any():
        least = flat["excess"].min()
        keep &= flat["excess"] <= least + 1e-6 * GB
        warnings.append(f"no plan fits the memory limit: the closest needs {least / GB:.1f} GB more per rank")
    else:
        keep &= flat["excess"] <= 0
    within = keep & (flat["deviation"] <= tolerance + 1e-9)
    if not within.any():
        best_dev = flat["deviation"][keep].min()
        within = keep & (flat["deviation"] <= best_dev + 0.01)
        warnings.append(f"no plan keeps every group's sample share within ±{tolerance:.0%} of the recipe's "
                        f"(closest: {best_dev:.0%})")
    keep = within
    best = flat["goodput"][keep].max()
    keep &= flat["goodput"] >= best - GOODPUT_TIE
    idx = np.flatnonzero(keep)
    order = np.lexsort((-flat["goodput"][idx], flat["batch_dev"][idx], np.round(flat["deviation"][idx], 2)))
    pick = idx[order[0]]
    combo = rows[which[pick]]["combo"]
    return list(combo), [int(c) for c in counts[split[pick]]]

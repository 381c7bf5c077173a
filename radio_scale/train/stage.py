"""What one rank needs for one stage: the plan, its groups, their teachers and data streams."""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from radio_scale.config import RunConfig
from radio_scale.data import STUDENT_MEAN, STUDENT_STD, ViewSpec, build_loader
from radio_scale.distributed.env import DistEnv
from radio_scale.distributed.parallel import shard_teacher
from radio_scale.distributed.plan import RankPlan, check_launch_plan, plan_for_run
from radio_scale.teachers import Teacher, build_teacher


@dataclass
class StageRuntime:
    """The stage's plan, this rank's groups (in turn, if several), their teachers and loaders."""

    index: int
    start_step: int  # global step at which the stage begins
    plan: RankPlan
    groups: list  # this rank's GroupPlans
    micro_steps: int  # SPMD: every rank runs this many micro-batches per step (dummies where it has fewer groups)
    plan_steps: int
    teachers: dict[str, Teacher] = field(default_factory=dict)
    loaders: dict[str, Any] = field(default_factory=dict)
    process_groups: dict[str, Any] = field(default_factory=dict)

    @property
    def end_step(self) -> int:
        return self.start_step + self.plan_steps

    def close(self) -> None:
        """Drop teachers and loaders (before building the next stage's)."""
        for loader in self.loaders.values():
            close = getattr(loader, "close", None)
            if close:
                close()
        self.loaders.clear()
        self.teachers.clear()
        gc.collect()


def teacher_view(t: Teacher) -> ViewSpec:
    """The data view a teacher expects (its size, normalisation and resize rule)."""
    return ViewSpec(name=t.name, size=t.input_size, mean=tuple(t.mean), std=tuple(t.std), resize_mode=t.resize_mode)


def stage_bounds(cfg: RunConfig) -> list[tuple[int, int]]:
    """(start, end) global steps of every stage."""
    out, s = [], 0
    for st in cfg.stages:
        out.append((s, s + st.steps))
        s += st.steps
    return out


def stage_at(cfg: RunConfig, step: int) -> int:
    """Index of the stage that global step `step` belongs to (the last stage once training is done)."""
    for i, (a, b) in enumerate(stage_bounds(cfg)):
        if a <= step < b:
            return i
    return len(cfg.stages) - 1


def build_stage(cfg: RunConfig, env: DistEnv, index: int, data_positions: Optional[dict] = None) -> StageRuntime:
    """Plan the stage, create its process subgroups (all ranks), build my teachers and data streams.

    The plan must be the one radio-launch printed and wrote to <run_dir>/plan.json: a rank that plans
    anything else refuses to start (RuntimeError naming the stage, group and field).
    """
    plan = plan_for_run(cfg, env.world_size, index)
    check_launch_plan(plan, cfg.run_dir)
    pgs = plan.build_process_groups(timeout_s=cfg.monitor.collective_timeout_s) if dist.is_initialized() else {}
    mine = plan.groups_of(env.rank)
    micro = max(len(plan.groups_of(r)) for r in range(env.world_size))
    start = stage_bounds(cfg)[index][0]
    rt = StageRuntime(index=index, start_step=start, plan=plan, groups=mine, micro_steps=micro,
                      process_groups=pgs, plan_steps=cfg.stages[index].steps)
    for g in mine:
        for name in g.teachers:
            if name in rt.teachers:
                continue
            tc = cfg.teacher(name)
            t = build_teacher(tc, device=env.device)
            pg = pgs.get(g.name)
            mode = g.teacher_sharding.get(name, tc.sharding)  # the plan resolved "auto" by size
            rt.teachers[name] = shard_teacher(t, mode, pg, env.device, cfg.precision)
    data_positions = data_positions or {}
    for g in mine:
        views = [teacher_view(rt.teachers[n]) for n in g.teachers]
        rt.loaders[g.name] = build_loader(
            cfg.data.shards,
            student_res=g.resolution,
            teacher_views=views,
            batch_size=g.batch_per_rank,
            seed=_group_seed(cfg.seed, index, g.name),
            rank=env.rank,
            world_size=env.world_size,
            num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            shards_per_chunk=cfg.data.shards_per_chunk,
            crop_scale=cfg.data.crop_scale,
            crop_ratio=cfg.data.crop_ratio,
            image_key=cfg.data.image_key,
            label_key=cfg.data.label_key,
            position=data_positions.get(g.name),
            bad_shard_warn_after=cfg.data.bad_shard_warn_after,
            allow_pipe_in_lists=cfg.data.allow_pipe_in_lists,
        )
    return rt


def _group_seed(seed: int, stage: int, group: str) -> int:
    """A stable per-(run, stage, group) data seed (python's hash() is salted per process, so not that)."""
    import zlib

    return (seed * 1_000_003 + stage * 7919 + zlib.crc32(group.encode())) % (2**31 - 1)


def student_view(res: int) -> ViewSpec:
    return ViewSpec(name="student", size=res, mean=STUDENT_MEAN, std=STUDENT_STD, resize_mode="squash")

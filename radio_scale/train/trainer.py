"""The distillation trainer: one Stateful object, one step function you can read top to bottom."""
from __future__ import annotations

import json
import logging
import math
import random
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from radio_scale.config import RunConfig, config_to_dict, config_to_yaml, flatten
from radio_scale.distributed.env import DistEnv
from radio_scale.distributed.backends import build_backend
from radio_scale.distributed.plan import group_active, make_plan, run_student_sharding, shard_group_size
from radio_scale.losses import build_balancer, crop_to_content, spatial_loss, summary_loss, term_weights
from radio_scale.models import AdaptorHeads
from radio_scale.models.heads import zero_link
from radio_scale.monitoring.heartbeat import Heartbeat
from radio_scale.monitoring.nan_guard import NanGuard
from radio_scale.monitoring.progress import StepProgress
from radio_scale.monitoring.rundir import METRICS, append_event, append_jsonl, atomic_write_json, read_jsonl
from radio_scale.monitoring.tracking import Tracker
from radio_scale.monitoring.watchdog import Watchdog
from radio_scale.teachers.spec import teacher_spec
from radio_scale.train.checkpoint import Checkpointer, checkpoint_world_size, latest_complete
from radio_scale.train.export import export_student
from radio_scale.train.optim import run_lr_at
from radio_scale.train.preemption import PreemptionFlag
from radio_scale.train.stage import StageRuntime, build_stage, stage_at, stage_bounds

log = logging.getLogger("radio_scale.train")
# The heads return reshaped (view) tensors that the loss only reads; FSDP2 warns about in-place use of views.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


class DistillModel(nn.Module):
    """Student + every adaptor head + the loss balancer: the one module that is sharded, optimised and saved."""

    def __init__(self, student: nn.Module, heads: AdaptorHeads, balancer: nn.Module,
                 standardizer: Optional[nn.Module] = None):
        super().__init__()
        self.student = student
        self.heads = heads
        self.balancer = balancer
        # loss.standardize=phi_s: the teachers' PHI-S transforms (buffers, so checkpoints carry the estimate)
        self.standardizer = standardizer

    def forward(self, images: torch.Tensor, window_size: int = 0, names=None, weighting: bool = False):
        """The predictions of every head for `images`: those in `names` (None: all) on the student's features, the
        others on one token, for the caller to join to its loss with zero weight (`zero_link`): every output of
        every module then gets a gradient on every rank (the root forward, so FSDP gathers the root's parameters;
        DeepSpeed ZeRO-3 counts each module's backward by the outputs that receive one).

        weighting: also return the balancer's (term weights, regulariser), computed here, inside the root's
        forward, where FSDP has gathered the balancer's parameters (outside it they are shards: DTensors).
        """
        preds = self.heads(self.student(images, window_size=window_size), names, linked=names is None)
        return (preds, self.balancer.weighting()) if weighting else preds


@dataclass
class StepStats:
    """What one step measured, reduced over all ranks."""

    loss: float
    terms: dict[str, float]
    weights: dict[str, float]
    grad_norm: float
    samples: int
    window: int
    finite: bool
    preempt: bool
    data: dict[str, float] = field(default_factory=dict)


def build_model(cfg: RunConfig) -> tuple[DistillModel, list]:
    """Student + all heads + balancer with the run's seeded initial weights (identical on every rank)."""
    torch.manual_seed(cfg.seed)
    specs = [teacher_spec(t) for t in cfg.teachers]
    static = term_weights(cfg.teachers, {s.name: s.has_summary for s in specs})
    from radio_scale.models.registry import build_any_student  # ViT presets, E-RADIO, timm:<name>

    student = build_any_student(cfg.student, [s.name for s in specs if s.has_summary])
    heads = AdaptorHeads(student.embed_dim, specs)
    standardizer = None
    if cfg.loss.standardize == "phi_s":
        from radio_scale.losses.phis import Standardizer

        dims = {}
        for s in specs:
            if s.has_summary:
                dims[f"{s.name}/summary"] = s.summary_dim
            dims[f"{s.name}/spatial"] = s.embed_dim
        standardizer = Standardizer(dims)
    return DistillModel(student, heads, build_balancer(cfg.loss, static), standardizer), specs


class Trainer:
    """Builds the run's model from its config and trains it; `state_dict()` holds everything a resume needs."""

    def __init__(self, cfg: RunConfig, env: DistEnv, run_dir: Path, on_hang=None):
        self.cfg, self.env, self.run_dir = cfg, env, Path(run_dir)
        self.on_hang = on_hang  # e.g. requeue the SLURM job before the watchdog exits the rank
        self.device = env.device
        self.model, self.specs = build_model(cfg)
        self.model.to(self.device)
        self.terms = list(self.model.balancer.names)
        student = self.model.student
        # the distributed backend (fsdp2 | deepspeed): the trainer calls its interface, never its name.
        # FSDP2: world FSDP or HSDP (parallel.student_sharding; the planner's choice under auto), once for the run
        self.student_sharding = run_student_sharding(cfg, env.world_size)
        self.backend = build_backend(cfg, env)
        self.backend.setup(self.model, student.blocks, self.student_sharding, shard_group_size(cfg))
        self.optimizer = self.backend.optimizer
        self.checkpointer = Checkpointer(
            Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints",
            keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save, rank=env.rank, world_size=env.world_size,
            kill_in_save_at=cfg.monitor.inject_kill_in_checkpoint,
        )
        self.nan_guard = NanGuard(rollback_after=cfg.monitor.nan_rollback_after)
        self.step = 0
        self.run_id: Optional[str] = None
        self.stage: Optional[StageRuntime] = None
        self._iters: dict = {}
        self._seed_rank_rng()
        # The student's own randomness (CPE crops) comes from this generator, reseeded every step (see
        # _seed_step): a resumed run draws exactly what an uninterrupted one drew, from any checkpoint.
        self.model.student.cpe.generator = torch.Generator(device="cpu")
        self.preemption = PreemptionFlag()
        self.tracker = Tracker(cfg.tracking.uri, self.run_dir, cfg.tracking.experiment, cfg.name, enabled=env.is_main)
        self.heartbeat = Heartbeat(self.run_dir, env.rank, every=cfg.monitor.heartbeat_every,
                                   every_s=cfg.monitor.heartbeat_every_s)  # by wall time: shared-disk load
        self.watchdog: Optional[Watchdog] = None
        self.stall_s: list[float] = []
        self._logged_until = 0
        self.compute_s = 0.0
        self._injected: set[int] = set()

    # ------------------------------------------------------------------ state
    def _seed_rank_rng(self) -> None:
        seed = self.cfg.seed * 100_003 + self.env.rank + 1
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (2**32))

    def _seed_step(self) -> None:
        """Seed every random consumer of the training step from (run seed, step, rank, purpose).

        CPE crops draw from the student's generator, DropPath and anything else under torch's global RNG from
        the global generator: both are reseeded here, so a step's randomness never depends on what ran before it
        (a data loader built on resume, an evaluation, a rollback), and resuming at any step is exact.
        """
        seed, step, rank = self.cfg.seed, self.step, self.env.rank
        torch.manual_seed(step_seed(seed, step, rank, "global"))
        self.model.student.cpe.generator.manual_seed(step_seed(seed, step, rank, "cpe"))

    def state_dict(self) -> tuple[dict, dict]:
        """(global trainer state for trainer.json, this rank's state); model/optimizer go through DCP."""
        trainer_state = {
            "step": self.step,
            "stage": stage_at(self.cfg, self.step),
            "run_id": self.run_id,
            "nan_guard": self.nan_guard.state_dict(),
            "world_size": self.env.world_size,
            "name": self.cfg.name,
        }
        rank_state = {
            "torch_rng": torch.get_rng_state(),
            "python_rng": _python_rng_to_tensor(),
            "numpy_rng": _numpy_rng_to_tensor(),
            "stage": self.stage.index if self.stage else -1,
            "data": {g: ld.state_dict() for g, ld in (self.stage.loaders.items() if self.stage else [])},
        }
        return trainer_state, rank_state

    def load_state_dict(self, trainer_state: dict, rank_state: Optional[dict]) -> Optional[dict]:
        """Restore counters and this rank's RNG; returns the data positions to resume the streams from."""
        self.step = int(trainer_state["step"])
        self.run_id = trainer_state.get("run_id")
        self.nan_guard.load_state_dict(trainer_state.get("nan_guard", {}))
        same_world = trainer_state.get("world_size") == self.env.world_size
        if rank_state is None or not same_world:
            # Another world size: model and optimizer reshard exactly; data streams restart from a seed derived
            # from the resume step (no replay of the samples already seen from the stream's start). The student's
            # randomness needs nothing here: every step reseeds it (_seed_step).
            self._seed_rank_rng()
            return {"_reseed": self.step}
        torch.set_rng_state(rank_state["torch_rng"])
        _python_rng_from_tensor(rank_state["python_rng"])
        _numpy_rng_from_tensor(rank_state["numpy_rng"])
        if rank_state.get("stage") != stage_at(self.cfg, self.step):
            return None  # saved at a stage end: the next stage starts fresh streams
        return rank_state.get("data")

    def save(self, block: bool = False) -> None:
        """Checkpoint now (all ranks)."""
        if self.watchdog:
            self.watchdog.phase("checkpoint")
        trainer_state, rank_state = self.state_dict()
        stall = self.checkpointer.save(self.step, self.backend, trainer_state, rank_state, block=block)
        if block:
            self.checkpointer.wait()
        self.stall_s.append(stall)
        if self.env.is_main:
            append_event(self.run_dir, "checkpoint", self.env.rank, f"checkpoint at step {self.step}",
                         step=self.step, stall_s=round(stall, 4))
        if self.watchdog:
            self.watchdog.phase("train")

    def resume(self) -> bool:
        """Load the newest complete checkpoint if there is one; True if resumed."""
        path = latest_complete(self.checkpointer.root) if self.env.is_main else None
        path = _broadcast_object(path)
        if path is None:
            return False
        trainer_state, rank_state = self.checkpointer.load(path, self.backend)
        positions = self.load_state_dict(trainer_state, rank_state)
        self._enter_stage(stage_at(self.cfg, self.step), positions)
        if self.env.is_main:
            append_event(self.run_dir, "resume", 0, f"resumed from {path.name} (written by "
                         f"{checkpoint_world_size(path)} ranks, now {self.env.world_size})", step=self.step)
        return True

    # ------------------------------------------------------------------ stages
    def _enter_stage(self, index: int, positions: Optional[dict] = None) -> None:
        if self.stage is not None:
            self.stage.close()
        reseed = positions.pop("_reseed", None) if positions else None
        cfg = self.cfg
        if reseed is not None:  # world size changed: streams seeded by the resume step
            from dataclasses import replace

            cfg = replace(cfg, seed=cfg.seed + 7919 * (reseed + 1))
            positions = None
        self.stage = build_stage(cfg, self.env, index, positions)
        self._iters = {g: iter(ld) for g, ld in self.stage.loaders.items()}
        if self.env.is_main:
            atomic_write_json(self.run_dir / f"plan_stage{index}.json", self.stage.plan.to_dict())
            append_event(self.run_dir, "start", 0, f"stage {index} '{cfg.stages[index].name}' at step {self.step}",
                         stage=index, step=self.step)
        self._estimate_standardizer()

    def _estimate_standardizer(self) -> None:
        """PHI-S: estimate the transforms of this stage's teachers that have none yet (loss.standardize=phi_s).

        Every rank runs loss.standardize_batches batches of each of its groups through their teachers, sums the
        feature statistics in float64, and all-reduces them (ranks without a teacher add zeros), so every rank
        computes the same transform once; checkpoints carry it, so a resumed run never re-estimates it.
        """
        std = getattr(self.model, "standardizer", None)
        if std is None:
            return
        from radio_scale.losses.phis import feature_rows, stats_of, transform_from_stats

        rt, dev = self.stage, self.device
        needed = []  # the same list on every rank: from the global plan
        for g in rt.plan.groups:
            for t in g.teachers:
                for term in (f"{t}/summary", f"{t}/spatial"):
                    if term in std.terms and term not in needed and not std.is_ready(term):
                        needed.append(term)
        if not needed:
            return
        dims = {term: std.parts(term)[0].numel() for term in needed}
        stats = {term: stats_of(None, c).to(dev) for term, c in dims.items()}
        for g in rt.groups:
            for _ in range(self.cfg.loss.standardize_batches):
                batch = next(self._iters[g.name]).normalized(dev)
                with torch.no_grad():
                    for name in g.teachers:
                        out = rt.teachers[name](batch.teachers[name])
                        feats = {f"{name}/summary": out.summary,
                                 f"{name}/spatial": crop_to_content(out.spatial.float(), batch.content.get(name))}
                        for term, x in feats.items():
                            if term in stats and x is not None:
                                stats[term] += stats_of(feature_rows(x.float()), dims[term]).to(dev)
        for term in needed:
            if dist.is_initialized():
                dist.all_reduce(stats[term])
            mean, tx, inv = transform_from_stats(stats[term].cpu(), dims[term])
            std.set(term, mean.to(dev), tx.to(dev), inv.to(dev))
        if self.env.is_main:
            counts = {term: int(stats[term][0]) for term in needed}
            append_event(self.run_dir, "phi_s", 0, f"PHI-S estimated for {', '.join(needed)} at step {self.step}",
                         step=self.step, vectors=counts)

    def window_size(self, step: int) -> int:
        """The step's attention window (0 = global), the same on every rank."""
        sizes = self.cfg.student.window_sizes
        return sizes[zlib.crc32(f"{self.cfg.seed}:{step}".encode()) % len(sizes)]

    # ------------------------------------------------------------------ the step
    def train_step(self, batches: Optional[dict] = None, apply: bool = True) -> StepStats:
        """One optimisation step: views → teachers → student → heads → losses → backward → clip → AdamW."""
        t_start = time.perf_counter()
        self._seed_step()
        rt, cfg, dev, world = self.stage, self.cfg, self.device, self.env.world_size
        std = getattr(self.model, "standardizer", None)
        window = self.window_size(self.step)
        active = {g.name: group_active(cfg.seed, rt.index, self.step, g.name, g.sampling_rate) for g in rt.plan.groups}
        n_samples = sum(g.batch_per_rank * len(g.ranks) for g in rt.plan.groups if active[g.name])
        denominators = loss_denominators(rt.plan.groups, active, cfg.loss.reduction)
        sums = torch.zeros(2 * len(self.terms), device=dev)  # per term: sum over samples, number of samples
        for i in range(rt.micro_steps):
            g = rt.groups[i] if i < len(rt.groups) else None
            real = g is not None and active[g.name]
            if real:
                batch = batches[g.name] if batches is not None else next(self._iters[g.name])
                batch = batch.normalized(dev)  # uint8 views cross to the device, normalised there
                images = batch.student
                with torch.no_grad():
                    targets = {n: rt.teachers[n](batch.teachers[n]) for n in g.teachers}
                names = list(g.teachers)
            else:  # SPMD: a rank with nothing to do this micro-step still joins every collective, with zero loss
                res = min(gp.resolution for gp in rt.plan.groups)
                images, targets, names = torch.zeros(1, 3, res, res, device=dev), {}, None
            # activation checkpointing as the plan chose for this group (a rank may compute several groups);
            # σReparam advances once per step, in the first micro-batch, on every rank
            self.model.student.set_activation_checkpointing(real and g.activation_checkpointing)
            self.model.student.set_spectral_advance(i == 0)
            self.backend.set_gradient_sync(i == rt.micro_steps - 1)
            # the balancer's weights come out of the root forward (its parameters are gathered only there)
            preds, (w_vec, regularizer) = self.backend.module(images, window_size=window, names=names, weighting=True)
            weights = dict(zip(self.terms, w_vec.unbind(0)))
            if i == 0:
                self._step_weights = w_vec.detach()
            # every head ran for the collectives; those without a target this micro-step join at zero weight
            idle = [p for n, pr in preds.items() if n not in targets for p in pr if p is not None]
            loss = zero_link(*idle).float() if idle else torch.zeros((), device=dev)
            for name, tgt in targets.items():
                pred = preds[name]
                per_term = {}
                # a padded teacher view (SAM): its map is cropped to the image content, as the student saw it
                target_map = crop_to_content(tgt.spatial.float(), batch.content.get(name))
                target_summary = None if tgt.summary is None else tgt.summary.float()
                if std is not None:  # PHI-S: the heads learn standardised targets
                    target_map = std.forward_map(f"{name}/spatial", target_map)
                    if target_summary is not None and f"{name}/summary" in std.terms:
                        target_summary = std.forward_map(f"{name}/summary", target_summary)
                if pred.summary is not None and target_summary is not None:
                    per_term[f"{name}/summary"] = summary_loss(pred.summary.float(), target_summary)
                per_term[f"{name}/spatial"] = spatial_loss(pred.spatial.float(), target_map, cfg.loss.alpha, cfg.loss.beta)
                for k, v in per_term.items():
                    j = self.terms.index(k)
                    sums[j] += v.detach().sum()  # stays on the device: no sync per term
                    sums[len(self.terms) + j] += v.numel()
                    # this rank's share of the term's mean over the step (loss.reduction: per teacher or per sample)
                    loss = loss + weights[k] * v.sum() / denominators[name]
            if self.step + 1 in cfg.monitor.inject_nan_steps and self.step + 1 not in self._injected:
                loss = loss * float("nan")  # fault drill (monitor.inject_nan_steps)
            # balancer parameters (uncertainty) get a gradient on every rank; the regulariser counts once
            loss = loss + 0.0 * sum(w.sum() for w in weights.values()) + regularizer * float(i == 0 and self.env.is_main)
            self.backend.backward(loss * world)  # the backends average gradients over ranks; undo it: global sum
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # kernels run asynchronously: time the work, not its launch
        self.compute_s = time.perf_counter() - t_start  # this rank's own work, before it waits for the others
        if self.step + 1 in cfg.monitor.inject_nan_steps:
            self._injected.add(self.step + 1)
        return self._finish_step(sums, n_samples, window, apply)

    def _finish_step(self, sums: torch.Tensor, n_samples: int, window: int, apply: bool) -> StepStats:
        """All-reduce the step's measurements, clip, check finiteness, and apply the optimizer step."""
        n_global = max(n_samples, 1)
        data = self._data_counters()
        extra = torch.tensor([float(self.preemption.requested), *data.values()])
        vec = torch.cat([sums, extra.to(self.device)])
        if dist.is_initialized():
            dist.all_reduce(vec)
        vec = vec.cpu()
        k = len(self.terms)
        term_sum, term_n = vec[:k], vec[k: 2 * k]
        terms = {t: float(term_sum[j] / term_n[j]) for j, t in enumerate(self.terms) if term_n[j] > 0}
        weights = dict(zip(self.terms, self._step_weights.float().cpu().tolist()))  # as this step's forward used
        if self.cfg.loss.reduction == "per_teacher":  # the sum of the weighted term means
            total = float(sum(weights[t] * term_sum[j] / term_n[j] for j, t in enumerate(self.terms) if term_n[j] > 0))
        else:
            total = float(sum(weights[t] * term_sum[j] for j, t in enumerate(self.terms)) / n_global)
        if apply:  # clip + step where the loss and the gradients are finite (no group sampled: nothing to learn)
            grad_norm, applied = self.backend.finish_step(
                self.cfg.optim.grad_clip, run_lr_at(self.step, self.cfg.stages, self.cfg.optim),
                allowed=math.isfinite(total) and n_samples > 0)
            if applied and hasattr(self.model.balancer, "update"):  # AdaLoss: from the globally reduced terms
                self.model.balancer.update(terms)
        else:  # gradients kept for inspection (tests): the norm only
            grad_norm = self.backend.grad_norm(self.cfg.optim.grad_clip)
        finite = math.isfinite(total) and math.isfinite(grad_norm)
        return StepStats(loss=total, terms=terms, weights=weights, grad_norm=grad_norm, samples=n_samples,
                         window=window, finite=finite, preempt=bool(vec[2 * k] > 0),
                         data=dict(zip(data.keys(), (float(x) for x in vec[2 * k + 1:]))))

    def _data_counters(self) -> dict[str, float]:
        """This rank's data counters for the step's all-reduce: data/seen, data/used, data/skipped (unusable samples
        and shard failures) and data/skipped/<reason>, cumulative over the run's stages and resumes; each bad shard
        is named once in events.jsonl (radio_scale/train/data_totals.py)."""
        from radio_scale.train.data_totals import DataTally

        tally = self.__dict__.get("_data_tally")
        if tally is None:
            tally = self._data_tally = DataTally(self.run_dir, self.env.rank, self.env.world_size,
                                                 self.checkpointer.root)
        return tally.update(self.stage, self.step)

    # ------------------------------------------------------------------ the loop
    def run(self, on_step=None) -> str:
        """Train to the end (or to a preemption); returns 'finished' or 'preempted'."""
        cfg, env = self.cfg, self.env
        mon = cfg.monitor
        self.watchdog = Watchdog(self.run_dir, env.rank, timeouts={
            "startup": mon.startup_timeout_s, "train": mon.hang_timeout_s, "checkpoint": mon.checkpoint_timeout_s},
            on_hang=self.on_hang)
        self.watchdog.phase("startup")
        self.preemption.install()
        try:
            resumed = self.resume()
            self.run_id = self.tracker.start(self.run_id)
            self.run_id = _broadcast_object(self.run_id)
            self._logged_until = self._last_logged_step() if env.is_main else 0
            if env.is_main:
                (self.run_dir / "config.yaml").write_text(config_to_yaml(cfg))
                if not resumed:
                    self.tracker.log_params(flatten(config_to_dict(cfg)))
                self.tracker.set_tags(self._run_tags())
                if cfg.tracking.system_metrics:
                    self.tracker.system_metrics(every_s=30.0)
            elif env.local_rank == 0 and cfg.tracking.system_metrics and (cfg.tracking.uri or "").startswith("http"):
                # one sampler per node; only against a tracking server (sqlite on a shared disk locks badly)
                self.node_tracker = Tracker(cfg.tracking.uri, self.run_dir, cfg.tracking.experiment, cfg.name)
                self.node_tracker.start(self.run_id)
                self.node_tracker.system_metrics(every_s=30.0)
            total = cfg.total_steps
            progress = StepProgress(total, initial=self.step, rank=env.rank, desc=cfg.name)
            self.watchdog.phase("train")
            while self.step < total:
                index = stage_at(cfg, self.step)
                if self.stage is None or self.stage.index != index:
                    self.watchdog.phase("startup")
                    self._enter_stage(index)
                    self.watchdog.phase("train")
                t0 = time.perf_counter()
                stats = self.train_step()
                dt = time.perf_counter() - t0
                action = self.nan_guard.check(stats.loss if stats.finite else float("nan"))
                if action == "rollback":
                    self._rollback()
                    continue
                if action == "skip" and env.is_main:
                    append_event(self.run_dir, "nan_skip", 0, f"non-finite loss at step {self.step + 1}: step skipped",
                                 step=self.step + 1)
                self.step += 1
                self.watchdog.progress()
                self.heartbeat.beat(step=self.step, stage=index, loss=stats.loss, step_time=self.compute_s, phase="train",
                                    group="+".join(g.name for g in self.stage.groups) or "-", wall_time=dt,
                                    force=stats.preempt or self.step in (total, stage_bounds(cfg)[index][1]))
                progress.update(self.step, loss=f"{stats.loss:.4f}", stage=index)
                self._log(stats, dt, index)
                if on_step:
                    on_step(self, stats)
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    self._periodic_eval()
                self.checkpointer.poll()
                stage_end = self.step == stage_bounds(cfg)[index][1]
                if stats.preempt:
                    self.save(block=True)
                    if env.is_main:
                        append_event(self.run_dir, "preempt", 0, f"preempted: saved step {self.step}", step=self.step)
                    return "preempted"
                in_streak = action == "skip"  # never checkpoint mid non-finite streak: rollbacks need a good state
                if (self.step % cfg.checkpoint.every == 0 and not in_streak) or stage_end:
                    self.save(block=stage_end and self.step == total)
            self.checkpointer.wait()
            self.watchdog.phase("checkpoint")
            export_dir = export_student(self.backend.full_state_dict(), cfg, self.specs, self.run_dir / "export",
                                        is_main=env.is_main)
            if env.is_main:
                self._log_final_artifacts(export_dir)
                append_event(self.run_dir, "finished", 0, f"finished {self.step} steps", step=self.step)
                self.tracker.end("FINISHED")
            return "finished"
        finally:
            if "progress" in locals():
                progress.close()
            self.checkpointer.close()
            self.preemption.uninstall()
            if self.watchdog:
                self.watchdog.stop()
            if self.stage is not None:
                self.stage.close()

    def _periodic_eval(self) -> None:
        """k-NN + teacher fidelity on held-out sets (every rank: the student is sharded), logged by rank 0."""
        from radio_scale.eval.report import run_periodic_eval

        if self.watchdog:
            self.watchdog.phase("checkpoint")  # evaluation takes longer than a step: use the long timeout
        model = self.backend.module

        def forward(images: torch.Tensor) -> dict:
            # through the root module: FSDP gathers the root's parameters and casts the input to the compute
            # dtype (bf16), as in training; calling the student directly would feed fp32 into bf16 weights
            preds = model(images, window_size=0, names=None)
            return to_teacher_space(preds, getattr(self.model, "standardizer", None))

        try:
            results = run_periodic_eval(self.model.student, self.model.heads, self.stage.teachers, self.cfg,
                                        self.step, tracker=self.tracker, forward=forward)
        finally:
            if self.watchdog:
                self.watchdog.phase("train")
        if self.env.is_main:
            append_jsonl(self.run_dir / "eval.jsonl", {"step": self.step, **results})

    def _run_tags(self) -> dict:
        """MLflow tags: recipe, cluster, world size, plan summary, git revision (from the launcher's launch.json)."""
        launch = json.loads((self.run_dir / "launch.json").read_text()) if (self.run_dir / "launch.json").is_file() else {}
        plans = []
        for i in range(len(self.cfg.stages)):
            plan = make_plan(self.cfg, self.env.world_size, i)
            groups = ", ".join(f"{g.name} {g.num_ranks}x{g.batch_per_rank}@{g.resolution}" for g in plan.groups)
            plans.append(f"{plan.stage_name}: {groups} (util {plan.utilisation:.2f})")
        return {"recipe": self.cfg.name, "world_size": self.env.world_size, "cluster": launch.get("cluster", "?"),
                "git_revision": launch.get("git_revision", "unknown"), "plan": " | ".join(plans)}

    def _log_final_artifacts(self, export_dir: Optional[Path]) -> None:
        """Resolved config, plans, loss curves and (if small) the export, as MLflow artifacts."""
        for name in ("config.yaml", "plan.json", "launch.json", *(f"plan_stage{i}.json" for i in range(len(self.cfg.stages)))):
            if (self.run_dir / name).is_file():
                self.tracker.log_artifact(self.run_dir / name)
        try:
            from radio_scale.eval.pictures import plot_loss_curves

            self.tracker.log_artifact(plot_loss_curves(self.run_dir / METRICS, self.run_dir / "loss_curves.png"))
        except Exception as e:  # a missing picture must not fail a finished run
            log.warning("loss curves not plotted: %s", e)
        if export_dir is not None:
            size = sum(p.stat().st_size for p in export_dir.iterdir())
            if size <= 200 * 2**20:
                self.tracker.log_artifact(export_dir, "export")
            else:
                self.tracker.log_artifact(export_dir / "config.yaml", "export")

    def _last_logged_step(self) -> int:
        """The newest step already in metrics.jsonl (a resumed run replays steps after its checkpoint)."""
        path = self.run_dir / METRICS
        records = read_jsonl(path, tail_bytes=1 << 16) if path.exists() else []
        return max((int(r.get("step", 0)) for r in records), default=0)

    def _rollback(self) -> None:
        """K non-finite steps in a row: restore the last complete checkpoint, keep the data streams moving."""
        self.checkpointer.wait()
        path = latest_complete(self.checkpointer.root) if self.env.is_main else None
        path = _broadcast_object(path)
        if path is None:
            raise RuntimeError(f"rank {self.env.rank}: {self.nan_guard.rollback_after} non-finite steps in a row "
                               "and no checkpoint to roll back to")
        trainer_state, _ = self.checkpointer.load(path, self.backend)
        self.step = int(trainer_state["step"])
        if self.env.is_main:
            append_event(self.run_dir, "nan_rollback", 0, f"rolled back to {path.name} after non-finite losses",
                         step=self.step)
        if self.stage is None or self.stage.index != stage_at(self.cfg, self.step):
            self._enter_stage(stage_at(self.cfg, self.step))

    def _log(self, stats: StepStats, dt: float, stage: int) -> None:
        # After a resume, steps up to the last one already logged are replayed: log each step once only.
        if not self.env.is_main or self.step <= self._logged_until:
            return
        rec = {
            "step": self.step, "stage": stage, "loss/total": stats.loss, "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": stats.grad_norm, "step_time": dt, "images_per_s": stats.samples / max(dt, 1e-9),
            "window_size": stats.window, "time": time.time(),
            **{f"loss/{k}": v for k, v in stats.terms.items()},
            **{f"weight/{k}": v for k, v in stats.weights.items()},
            **stats.data,
        }
        if torch.cuda.is_available():
            rec["memory/max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            import psutil

            rec["memory/rss_gb"] = psutil.Process().memory_info().rss / 2**30
        append_jsonl(self.run_dir / METRICS, rec)
        self._logged_until = self.step
        if self.step % self.cfg.tracking.log_every == 0 or self.step == self.cfg.total_steps:
            self.tracker.log_metrics({k: v for k, v in rec.items() if k not in ("step", "time")}, step=self.step)


def to_teacher_space(preds: dict, standardizer) -> dict:
    """Head outputs in the teachers' own feature spaces (PHI-S inverse where a transform is set; else as is)."""
    if standardizer is None:
        return preds
    from radio_scale.models.heads import HeadOutput

    out = {}
    for name, p in preds.items():
        summary, spatial = p.summary, p.spatial
        if summary is not None and f"{name}/summary" in standardizer.terms and standardizer.is_ready(f"{name}/summary"):
            summary = standardizer.inverse_map(f"{name}/summary", summary.float())
        if standardizer.is_ready(f"{name}/spatial"):
            spatial = standardizer.inverse_map(f"{name}/spatial", spatial.float())
        out[name] = HeadOutput(summary, spatial)
    return out


def step_seed(seed: int, step: int, rank: int, purpose: str) -> int:
    """A 63-bit seed for one (run seed, step, rank, purpose): independent streams, stable across processes."""
    entropy = [seed, step, rank, zlib.crc32(purpose.encode())]
    return int(np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def loss_denominators(groups, active: dict, reduction: str) -> dict[str, int]:
    """What each teacher's summed per-sample terms are divided by in this step.

    per_teacher: the number of samples that carried the teacher in this step over all ranks (the groups that
    hold it and were sampled), so each term is that teacher's per-sample mean and its weight λ_i / γ_i is
    the weight it has in the objective, whatever share of the batch it sees (the paper's γ_i = 1).
    per_sample: the step's global sample count, the same for every teacher (a teacher seen by 64 of 1,088
    samples then weighs 64/1,088 of a teacher seen by all).
    """
    n_global = max(1, sum(g.batch_per_rank * len(g.ranks) for g in groups if active[g.name]))
    out: dict[str, int] = {}
    for g in groups:
        for t in g.teachers:
            n = g.batch_per_rank * len(g.ranks) if active[g.name] else 0
            out[t] = out.get(t, 0) + n
    if reduction == "per_sample":
        return {t: n_global for t in out}
    return {t: max(n, 1) for t, n in out.items()}


def loss_weights(balancer) -> tuple[dict, torch.Tensor]:
    """Each term's weight as it enters the loss (differentiable for learned weights), and the regulariser.

    The trainer sums weight x partial term over ranks and micro-steps and adds the regulariser once per step.
    """
    w, reg = balancer.weighting()
    return {n: w[i] for i, n in enumerate(balancer.names)}, reg


def _broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _python_rng_to_tensor() -> torch.Tensor:
    version, state, gauss = random.getstate()
    return torch.tensor(list(state) + [-1 if gauss is None else 0], dtype=torch.int64)


def _python_rng_from_tensor(t: torch.Tensor) -> None:
    vals = t.tolist()
    random.setstate((3, tuple(vals[:-1]), None))


def _numpy_rng_to_tensor() -> torch.Tensor:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return torch.tensor(list(keys.astype(np.int64)) + [pos, has_gauss], dtype=torch.int64)


def _numpy_rng_from_tensor(t: torch.Tensor) -> None:
    vals = t.tolist()
    np.random.set_state(("MT19937", np.array(vals[:-2], dtype=np.uint32), vals[-2], vals[-1], 0.0))

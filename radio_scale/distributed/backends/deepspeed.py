"""DeepSpeed ZeRO (stages 1, 2, 3; optional CPU offload) as the student's backend.

The student, every head and the balancer form one DeepSpeed engine over the world; the recipe configures it
(`deepspeed.zero_stage`, `deepspeed.offload_optimizer`, `deepspeed.offload_param`, `deepspeed.config` merged over
the generated dict): no separate JSON file. The optimizer is the trainer's own (fused AdamW with the same
parameter groups), wrapped by ZeRO; clipping is DeepSpeed's (`gradient_clipping` = optim.grad_clip). Gradient
accumulation across a rank's micro-steps is driven by the trainer (set_gradient_accumulation_boundary), so the
heterogeneous groups, sampling rates and the loss reduction are exactly the FSDP2 backend's. Precision: bf16 on a
GPU (DeepSpeed's bf16 mode: fp32 master weights in the optimizer), fp32 on CPU.

Checkpoints are DeepSpeed's own sharded format (engine.save_checkpoint into the Checkpointer's temporary
directory, so the atomic rename, the .complete marker and keep-last-k are unchanged); a checkpoint written by
another number of ranks is converted once to DeepSpeed's universal format (deepspeed.checkpoint.ds_to_universal,
beside it) and loaded with `load_universal`.
"""
from __future__ import annotations

import math
import os
import shutil
from argparse import Namespace
from pathlib import Path

import torch
import torch.distributed as dist

from radio_scale.distributed.backends.base import Backend
from radio_scale.distributed.parallel import uses_bf16
from radio_scale.train.optim import build_optimizer, set_lr

UNIVERSAL = "universal"  # sub-directory of a checkpoint holding its universal-format conversion


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg, device: torch.device) -> dict:
    """The DeepSpeed config dict of a run (what deepspeed.initialize gets)."""
    ds = cfg.deepspeed
    zero = {"stage": ds.zero_stage, "contiguous_gradients": True, "overlap_comm": device.type == "cuda",
            "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000}
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param}
    out = {
        "train_micro_batch_size_per_gpu": 1,  # the trainer forms its batches; DeepSpeed's batch bookkeeping is unused
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the trainer's fused torch AdamW
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": uses_bf16(device, cfg.precision)},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    return _merge(out, dict(ds.config))


class _CastInputs:
    """The engine's forward with floating-point tensor inputs cast to the compute dtype (DeepSpeed's bf16 mode
    holds bf16 parameters but, unlike FSDP2's policy, leaves inputs as they come)."""

    def __init__(self, engine, dtype: torch.dtype):
        self.engine, self.dtype = engine, dtype

    def __call__(self, *args, **kwargs):
        def cast(x):
            return x.to(self.dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

        return self.engine(*(cast(a) for a in args), **{k: cast(v) for k, v in kwargs.items()})


class DeepSpeedBackend(Backend):
    name = "deepspeed"
    supports_async_save = False

    def setup(self, model, student_blocks, student_sharding, shard_group_size) -> None:
        import deepspeed

        if not dist.is_initialized():
            raise RuntimeError("distributed_backend deepspeed needs torch.distributed initialised "
                               "(radio_scale.distributed.env.init_distributed), also at world size 1")
        # DeepSpeed reads the rank layout from the environment (torchrun sets it; SLURM ranks and one-process runs
        # may not): give it the layout torch.distributed was initialised with
        for key, value in (("LOCAL_RANK", self.env.local_rank), ("RANK", self.env.rank),
                           ("WORLD_SIZE", self.env.world_size)):
            os.environ.setdefault(key, str(value))
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
        self.stage = self.cfg.deepspeed.zero_stage
        self.model = model
        self.ds_config = deepspeed_config(self.cfg, self.env.device)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, self.cfg.optim),
                                                      config=self.ds_config, dist_init_required=False)
        self.engine, self.optimizer = engine, optimizer
        self.module = _CastInputs(engine, torch.bfloat16) if self.ds_config["bf16"]["enabled"] else engine
        if self.stage >= 3:
            # the balancer's weights are computed in the root forward (DistillModel.forward calls its weighting()
            # method, not its forward): ZeRO-3 must gather its parameters for the root's forward and backward
            for p in model.balancer.parameters():
                deepspeed.zero.register_external_parameter(model, p)

    def set_gradient_sync(self, on: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(bool(on))

    def backward(self, loss) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def _overflow(self) -> bool:
        """Non-finite gradients on any rank (ZeRO's own check, all-reduced)."""
        opt = self.optimizer
        if self.stage >= 3:
            return bool(opt.has_overflow())
        return bool(opt.has_overflow(partition_gradients=opt.partition_gradients))

    def _discard(self) -> None:
        """Drop this step's gradients without an optimizer step (as ZeRO does on an overflow)."""
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        if self.stage >= 3:
            if getattr(opt, "offload_optimizer", False):
                opt.reset_cpu_buffers()
            else:
                opt.averaged_gradients = {}
        else:
            if getattr(opt, "cpu_offload", False):
                opt.reset_cpu_buffers()
            for k in list(getattr(opt, "averaged_gradients", {}).keys()):
                opt.averaged_gradients[k] = None
            for k in list(getattr(opt, "all_grad_tensors", {}).keys()):
                opt.all_grad_tensors[k] = None
        self.engine.set_gradient_accumulation_boundary(True)

    def finish_step(self, max_norm, lr, allowed):
        if allowed and not self._overflow():
            set_lr(self.optimizer, lr)
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
            return norm, math.isfinite(norm)
        self._discard()
        return float("nan"), False

    def full_grads(self):
        from deepspeed.utils import safe_get_full_grad

        out = {}
        for name, p in self.model.named_parameters():
            g = safe_get_full_grad(p)
            if g is not None:
                out[name] = g.detach().clone().cpu()
        return out

    def write_state(self, directory: Path, asynchronous: bool, process_group=None):
        self.engine.save_checkpoint(str(directory.parent), tag=directory.name, client_state={}, save_latest=False)
        return None

    def read_state(self, path: Path, with_optimizer: bool, written_by: int) -> None:
        path = Path(path)
        world = dist.get_world_size()
        universal = written_by != world
        if universal:
            path = self._universal(path)
        self.engine._config.load_universal_checkpoint = universal
        try:
            loaded, _ = self.engine.load_checkpoint(
                str(path.parent), tag=path.name, load_optimizer_states=with_optimizer,
                load_lr_scheduler_states=False, load_module_only=not with_optimizer)
        finally:
            self.engine._config.load_universal_checkpoint = False
        if loaded is None:
            raise RuntimeError(f"rank {dist.get_rank()}: DeepSpeed could not load the checkpoint {path}")

    def _universal(self, path: Path) -> Path:
        """The universal-format copy of a checkpoint (converted once, by rank 0, beside the shards)."""
        out = path / UNIVERSAL
        if dist.get_rank() == 0 and not (out / ".done").is_file():
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            shutil.rmtree(out, ignore_errors=True)
            tmp = path / (UNIVERSAL + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            ds_to_universal(Namespace(input_folder=str(path), output_folder=str(tmp), num_extract_workers=1,
                                      num_merge_workers=1, keep_temp_folder=False, strict=True,
                                      inject_missing_state=True))
            tmp.rename(out)
            (out / ".done").write_text("")
        dist.barrier()
        return out

    def full_state_dict(self) -> dict:
        module = self.engine.module
        if self.stage >= 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

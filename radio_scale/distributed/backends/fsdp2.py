"""FSDP2 (fully_shard) over the world or HSDP on a 2-D mesh; DCP checkpoints (async), resharded on load."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from radio_scale.distributed.backends.base import Backend
from radio_scale.distributed.parallel import shard_student
from radio_scale.train.optim import build_optimizer, set_lr


class FSDP2Backend(Backend):
    name = "fsdp2"
    supports_async_save = True

    def setup(self, model, student_blocks, student_sharding, shard_group_size) -> None:
        shard_student(model, student_blocks, self.env.device, self.cfg.precision,
                      shard_group_size if student_sharding == "hybrid" else 0)
        self.model = self.module = model
        self.optimizer = build_optimizer(model, self.cfg.optim)

    def set_gradient_sync(self, on: bool) -> None:
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(on)

    def backward(self, loss) -> None:
        loss.backward()

    def finish_step(self, max_norm, lr, allowed):
        norm = self.grad_norm(max_norm)  # clips in place
        applied = allowed and math.isfinite(norm)
        if applied:
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    def grad_norm(self, max_norm):
        """The global gradient norm; clips the gradients to max_norm (clip_grad_norm_)."""
        norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def full_grads(self):
        out = {}
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                g = p.grad
                out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
        return out

    def _state(self, with_optimizer: bool = True) -> dict:
        state = {"model": get_model_state_dict(self.model)}
        if with_optimizer:
            state["optim"] = get_optimizer_state_dict(self.model, self.optimizer)
        return state

    def write_state(self, directory: Path, asynchronous: bool, process_group=None):
        state = self._state()
        if asynchronous:
            return dcp.async_save(state, checkpoint_id=str(directory), process_group=process_group)
        dcp.save(state, checkpoint_id=str(directory))
        return None

    def read_state(self, path: Path, with_optimizer: bool, written_by: int) -> None:
        state = self._state(with_optimizer)
        dcp.load(state, checkpoint_id=str(path))  # DCP reshards: any world size, either student sharding
        set_model_state_dict(self.model, state["model"])
        if with_optimizer:
            set_optimizer_state_dict(self.model, self.optimizer, state["optim"])

    def full_state_dict(self) -> dict:
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

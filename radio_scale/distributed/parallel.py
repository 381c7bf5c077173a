"""Sharding: FSDP2 for the student + every head over the world; teachers sharded over their group or replicated."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

# A teacher above this many parameters is sharded over its group when its config says "auto".
AUTO_SHARD_PARAMS = 1_000_000_000


def uses_bf16(device: torch.device, precision: str) -> bool:
    """The run's compute dtype rule: `precision` bf16, or auto on a GPU (auto on CPU stays fp32: bf16 matmuls
    are about 10x slower there). Student, heads and teachers all follow it."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def mixed_precision(device: torch.device, precision: str) -> Optional[MixedPrecisionPolicy]:
    """bf16 params for compute / fp32 master weights and gradient reduction when `uses_bf16`; None (fp32) otherwise."""
    if not uses_bf16(device, precision):
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def world_mesh(device: torch.device) -> DeviceMesh:
    """A 1-D mesh over all ranks."""
    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard_student(model: nn.Module, blocks: nn.ModuleList, device: torch.device, precision: str) -> nn.Module:
    """FSDP2 per transformer block, then the root (patch embed, position grid, tokens, heads, balancer).

    Activation checkpointing is not applied here: it is a per-block switch the trainer sets for each micro-batch
    from the plan of the group being computed (RadioStudent.set_activation_checkpointing).
    """
    mp = mixed_precision(device, precision)
    if mp is None and (not dist.is_initialized() or dist.get_world_size() == 1):
        # One rank in fp32: FSDP2 would only add per-step buffer copies and DTensor dispatch (1.31x step time
        # measured in benchmarks/trainer_overhead.py); a plain module checkpoints and reshards the same way
        # through DCP. In bf16 a one-rank mesh is used, so one GPU computes exactly as each rank of many does.
        return model
    if not dist.is_initialized():
        raise RuntimeError(f"precision '{precision}' on {device}: the student's bf16 policy is FSDP2's, which needs "
                           "torch.distributed initialised (radio_scale.distributed.env.init_distributed)")
    mesh = world_mesh(device)
    kw = {"mesh": mesh}
    if mp is not None:
        kw["mp_policy"] = mp
    for blk in blocks:
        fully_shard(blk, **kw)
    fully_shard(model, **kw)
    return model


def shard_teacher(teacher: nn.Module, mode: str, group: Optional[dist.ProcessGroup], device: torch.device,
                  precision: str) -> nn.Module:
    """A frozen teacher: FSDP2 over its group's ranks ("fsdp"), or a full copy per rank ("replicate")."""
    n_params = sum(p.numel() for p in teacher.parameters())
    if mode == "auto":
        mode = "fsdp" if n_params >= AUTO_SHARD_PARAMS else "replicate"
    if uses_bf16(device, precision):
        # Teachers only run forward: a bf16 copy (inputs cast by Teacher.check_input) needs no fp32 master
        # weights; tests/test_precision.py checks it against FSDP2's bf16 param policy on the same teacher.
        teacher.to(torch.bfloat16)
    if mode == "replicate" or group is None or dist.get_world_size(group) <= 1:
        return teacher
    mesh = DeviceMesh.from_group(group, device.type)
    # Shard each transformer block if the teacher exposes them, so only one block is gathered at a time.
    for name in ("blocks", "resblocks", "layers"):
        for mod in teacher.modules():
            seq = getattr(mod, name, None)
            if isinstance(seq, nn.ModuleList) and len(seq) > 1 and any(p.numel() for p in seq.parameters()):
                for blk in seq:
                    fully_shard(blk, mesh=mesh)
    fully_shard(teacher, mesh=mesh)
    from torch.distributed.fsdp import register_fsdp_forward_method

    for method in ("forward_features", "encode_image"):
        if hasattr(teacher, method):
            register_fsdp_forward_method(teacher, method)
    return teacher

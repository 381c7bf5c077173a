"""Sharding: FSDP2 for the student + every head over the world (or HSDP: within node-aligned shard groups,
replicated across them); teachers sharded over their group or replicated."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

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


def student_mesh(device: torch.device, shard_group_size: int = 0) -> DeviceMesh:
    """The student's mesh: 1-D over the world (`shard_group_size` 0 or >= world), or 2-D (replicate, shard) with
    shard groups of `shard_group_size` consecutive ranks (one node each) for HSDP."""
    world = dist.get_world_size()
    if not shard_group_size or shard_group_size >= world:
        return world_mesh(device)
    if world % shard_group_size:
        raise ValueError(f"hybrid student sharding: world size {world} is not a multiple of the shard group size "
                         f"{shard_group_size} (parallel.shard_group_size / hardware.ranks_per_node)")
    return init_device_mesh(device.type, (world // shard_group_size, shard_group_size),
                            mesh_dim_names=("replicate", "shard"))


def shard_student(model: nn.Module, blocks: nn.ModuleList, device: torch.device, precision: str,
                  shard_group_size: int = 0) -> nn.Module:
    """FSDP2 per transformer block, then the root (patch embed, position grid, tokens, heads, balancer).

    shard_group_size (the plan's, under `parallel.student_sharding: hybrid`): HSDP on a 2-D mesh. Each unit is
    sharded within its shard group (all-gathers and reduce-scatters stay inside a node) and replicated across
    shard groups, whose gradients meet in one all-reduce per unit in backward, issued on FSDP2's all-reduce
    stream: the compute of one shard group never waits for another's until the end of backward. Teacher groups
    that own whole shard groups therefore stop waiting for each other at every block. The gradient is still the
    mean over all ranks (FSDP2 divides by shard x replicate size), so the trainer's scaling is unchanged.

    Activation checkpointing is not applied here: it is a per-block switch the trainer sets for each micro-batch
    from the plan of the group being computed (RadioStudent.set_activation_checkpointing).
    """
    mp = mixed_precision(device, precision)
    if mp is None and (not dist.is_initialized() or dist.get_world_size() == 1):
        # One rank in fp32: FSDP2 would only add per-step buffer copies and DTensor dispatch (1.31x step time
        # measured by an earlier benchmarks/trainer_overhead.py); a plain module checkpoints and reshards the same way
        # through DCP. In bf16 a one-rank mesh is used, so one GPU computes exactly as each rank of many does.
        return model
    if not dist.is_initialized():
        raise RuntimeError(f"precision '{precision}' on {device}: the student's bf16 policy is FSDP2's, which needs "
                           "torch.distributed initialised (radio_scale.distributed.env.init_distributed)")
    mesh = student_mesh(device, shard_group_size)
    kw = {"mesh": mesh}
    if mp is not None:
        kw["mp_policy"] = mp
    for blk in blocks:
        fully_shard(blk, **kw)
    fully_shard(model, **kw)
    return model


BLOCK_LIST_NAMES = ("blocks", "resblocks", "layers")


def teacher_encoder(teacher: nn.Module) -> nn.Module:
    """The part of a teacher its forward runs: open_clip's image tower (its timm trunk, if it has one), SAM's
    image encoder, the timm model of a DINOv2/timm teacher. CLIP's text tower and SAM's prompt encoder and
    mask decoder are not in it."""
    model = getattr(teacher, "model", teacher)
    family = getattr(teacher, "family", "")
    if family == "open_clip" or hasattr(model, "visual"):
        visual = model.visual
        return getattr(visual, "trunk", visual)
    if family == "sam" or hasattr(model, "image_encoder"):
        return model.image_encoder
    return model


def block_lists(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's transformer block containers (nn.ModuleList or nn.Sequential called blocks / resblocks /
    layers, e.g. open_clip's transformer.resblocks, timm's DINOv2 `blocks` Sequential, SAM's `blocks`)."""
    found = []
    for mod in encoder.modules():
        for name in BLOCK_LIST_NAMES:
            seq = getattr(mod, name, None)
            if (isinstance(seq, (nn.ModuleList, nn.Sequential)) and len(seq) > 1 and seq not in found
                    and any(p.numel() for p in seq.parameters())):
                found.append(seq)
    return found


def shard_teacher(teacher: nn.Module, mode: str, group: Optional[dist.ProcessGroup], device: torch.device,
                  precision: str) -> nn.Module:
    """A frozen teacher: FSDP2 over its group's ranks ("fsdp"), or a full copy per rank ("replicate").

    The plan resolves "auto" (by memory, `radio_scale.distributed.plan`); called directly, "auto" replicates.
    Sharded, the image encoder becomes one FSDP unit per transformer block plus one for the rest of it, so a
    forward all-gathers one block at a time (the next one prefetched) instead of the whole encoder at once.
    What the forward never runs (CLIP's text tower and its scalar `logit_scale`, which FSDP cannot shard, SAM's
    prompt encoder and mask decoder) stays whole on every rank.
    """
    if uses_bf16(device, precision):
        # Teachers only run forward: a bf16 copy (inputs cast by Teacher.check_input) needs no fp32 master
        # weights; tests/test_precision.py checks it against FSDP2's bf16 param policy on the same teacher.
        teacher.to(torch.bfloat16)
    if mode != "fsdp" or group is None or dist.get_world_size(group) <= 1:
        return teacher
    from torch.distributed.fsdp import register_fsdp_forward_method

    mesh = DeviceMesh.from_group(group, device.type)
    encoder = teacher_encoder(teacher)
    for seq in block_lists(encoder):
        for blk in seq:
            fully_shard(blk, mesh=mesh)
    fully_shard(encoder, mesh=mesh)
    # the adapters call these methods of the encoder rather than forward (timm: forward_features + forward_head)
    for method in ("forward_features", "forward_head"):
        if hasattr(encoder, method):
            register_fsdp_forward_method(encoder, method)
    return teacher

"""Distributed backends behind one interface: FSDP2 (default) and DeepSpeed ZeRO.

The trainer builds one with `build_backend(cfg, env)` and only ever calls the `Backend` interface: wrap the
student + heads + balancer over the world, route the forward, backward, gradient sync across micro-steps,
clipping and the optimizer step, write and read a sharded checkpoint, and gather the full weights for the
export. Frozen teachers are sharded the same way under both (FSDP2 over the group's ranks, one unit per block:
ZeRO-3-style partitioning of a forward-only module; see radio_scale.distributed.parallel.shard_teacher).
"""
from __future__ import annotations

from radio_scale.distributed.backends.base import Backend


def build_backend(cfg, env) -> Backend:
    """The backend named by `cfg.distributed_backend`."""
    if cfg.distributed_backend == "deepspeed":
        from radio_scale.distributed.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg, env)
    from radio_scale.distributed.backends.fsdp2 import FSDP2Backend

    return FSDP2Backend(cfg, env)


__all__ = ["Backend", "build_backend"]

"""Process-group set-up from the standard environment (torchrun, SLURM via submitit, or a single process)."""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: global rank, world size, local rank, device and backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (for single-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_from_slurm() -> None:
    """Under srun without torchrun, export RANK/WORLD_SIZE/... from SLURM (submitit's helper does the rest)."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    except Exception:  # not a submitit job: plain srun
        os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
        os.environ.setdefault("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))


def init_distributed(timeout_s: float = 600.0, device: str = "auto") -> DistEnv:
    """Initialise torch.distributed from the environment (gloo on CPU, NCCL on GPU); world of 1 if unset."""
    _env_from_slurm()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world > 1:
                raise RuntimeError(f"rank {rank}: MASTER_PORT is not set for a world of {world}")
            os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
        )
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend)


def shutdown() -> None:
    """Destroy the process group (gloo aborts at exit otherwise)."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass

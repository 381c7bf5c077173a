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


def slurm_hostnames(nodelist: str) -> list[str]:
    """SLURM's compressed host list expanded in order: 'gpu[01-03,07],login-2' -> gpu01, gpu02, gpu03, gpu07, login-2.

    Ranges keep their zero padding; several bracket groups in one name (rack[1-2]-n[1-2]) expand as SLURM does.
    Anything else raises ValueError (the caller then asks `scontrol show hostnames`).
    """
    items, depth, cur = [], 0, ""
    for ch in nodelist.strip():
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {nodelist!r}")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise ValueError(f"unbalanced '[' in node list {nodelist!r}")
    items.append(cur)
    hosts: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            raise ValueError(f"empty host name in node list {nodelist!r}")
        hosts += _expand_host(item, nodelist)
    return hosts


def _expand_host(item: str, nodelist: str) -> list[str]:
    if "[" not in item:
        return [item]
    head, rest = item.split("[", 1)
    body, tail = rest.split("]", 1)
    values = []
    for part in body.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"cannot read range '{part}' in node list {nodelist!r}")
        if not sep:
            values.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range '{part}' in node list {nodelist!r}")
        values += [str(v).zfill(len(lo)) for v in range(int(lo), int(hi) + 1)]
    return [head + v + t for v in values for t in _expand_host(tail, nodelist)] if tail else [head + v for v in values]


def _first_slurm_host(env) -> str:
    """The first host of the job step (where SLURM puts task 0): the rendezvous address of a multi-node run."""
    import shutil
    import subprocess

    for key in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        nodelist = env.get(key, "").strip()
        if nodelist:
            break
    else:
        nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        if nodes > 1:
            raise RuntimeError(f"rank {env.get('SLURM_PROCID')} on {socket.gethostname()}: a {nodes}-node SLURM job "
                               "without SLURM_JOB_NODELIST: cannot tell where rank 0 listens; set MASTER_ADDR")
        return "127.0.0.1"  # one node: rank 0 is on this machine
    try:
        return slurm_hostnames(nodelist)[0]
    except ValueError as parse_error:
        scontrol = shutil.which("scontrol")
        if scontrol:
            try:
                out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                     timeout=30, check=True).stdout.split()
                if out:
                    return out[0]
            except (OSError, subprocess.SubprocessError):
                pass
        raise RuntimeError(f"rank {env.get('SLURM_PROCID')} on {socket.gethostname()}: cannot read the first host of "
                           f"{key}={nodelist!r} ({parse_error}); set MASTER_ADDR") from None


def _slurm_port(job_id: str) -> int:
    """A port every task of the job derives alike (as submitit does): 20000..60000 seeded by the job id."""
    import random

    return random.Random(job_id).randint(20000, 60000)


def _env_from_slurm() -> None:
    """Under srun without torchrun: RANK/WORLD_SIZE/LOCAL_RANK from SLURM's task variables, MASTER_ADDR from the
    job's node list (its first host), MASTER_PORT from the job id; what is already set is kept.

    No fallback to 127.0.0.1 on a multi-node job: a node list that cannot be read is an error naming it.
    """
    env = os.environ
    if "RANK" in env or "SLURM_PROCID" not in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env.setdefault("WORLD_SIZE", env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or "1")
    env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    if "SLURM_NTASKS_PER_NODE" in env and env["SLURM_NTASKS_PER_NODE"].isdigit():
        env.setdefault("LOCAL_WORLD_SIZE", env["SLURM_NTASKS_PER_NODE"])
    if int(env["WORLD_SIZE"]) > 1:
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = _first_slurm_host(env)
        if "MASTER_PORT" not in env:
            job = env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID")
            if not job:
                raise RuntimeError(f"rank {env['RANK']} on {socket.gethostname()}: SLURM task without SLURM_JOB_ID: "
                                   "cannot derive MASTER_PORT; set it")
            env["MASTER_PORT"] = str(_slurm_port(job))


def cuda_device_index(local_rank: int, visible: int, rank: int = 0) -> int:
    """Which of the visible GPUs this rank drives.

    A task that sees the node's GPUs (torchrun, srun --gpus-per-node) drives GPU `local_rank`; a task that sees
    only its own (srun --gpus-per-task=1: CUDA_VISIBLE_DEVICES holds one id) drives GPU 0, whatever its local rank.
    """
    if visible < 1:
        raise RuntimeError(f"rank {rank} on {socket.gethostname()}: no visible GPU "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise RuntimeError(f"rank {rank} on {socket.gethostname()}: local rank {local_rank} but only {visible} GPUs are "
                       f"visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): one "
                       "rank per GPU, or one GPU per task")


def cuda_unavailable_reason() -> str:
    """Why torch cannot use CUDA here, in one line (driver too old for this build, no driver, CPU-only build)."""
    try:
        torch.cuda.init()
    except Exception as e:  # the message is torch's own diagnosis
        text = " ".join(str(e).split())
        return text[:300] or type(e).__name__
    return f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build {torch.version.cuda})"


def init_distributed(timeout_s: float = 600.0, device: str = "auto") -> DistEnv:
    """Initialise torch.distributed from the environment (gloo on CPU, NCCL on GPU); world of 1 if unset.

    device: "auto" (a GPU if one is usable), "cpu", or "cuda" — then a rank whose GPU is unusable (no driver, a
    driver too old for the installed CUDA build) refuses to start with one line naming the rank and the host,
    instead of training on its CPU.
    """
    _env_from_slurm()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"rank {rank} on {socket.gethostname()}: device 'cuda' was asked for but CUDA is unusable "
                           f"here: {cuda_unavailable_reason()}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        index = cuda_device_index(local_rank, torch.cuda.device_count(), rank)
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
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

"""torchrun for local runs, with every TCP store it hosts listening on 127.0.0.1 only.

`python -m radio_scale.launchers.loopback_torchrun <torchrun arguments>` is `python -m torch.distributed.run`,
except that a c10d TCPStore server started in this process (the rendezvous store and the store the ranks share
through TORCHELASTIC_USE_AGENT_STORE) is handed a socket bound to 127.0.0.1. torch's TCPStore binds every
interface (`::`/0.0.0.0) whatever host name it is given, so `--rdzv-endpoint 127.0.0.1:0` alone would still
leave the store reachable from the network during a local run. Pass `--local-addr 127.0.0.1` as well, so the
ranks connect to the store where it listens (radio_scale.launchers.local.local_command does both).
"""
from __future__ import annotations

import socket
from datetime import timedelta

LOOPBACK = "127.0.0.1"


def loopback_listener(port: int) -> tuple[int, int]:
    """(fd, port) of a TCP socket listening on 127.0.0.1:port (port 0: any free one); the caller owns the fd."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, port))
        sock.listen(socket.SOMAXCONN)
        bound = sock.getsockname()[1]
    except OSError:
        sock.close()
        raise
    return sock.detach(), bound


def install() -> type:
    """Make this process's TCPStore servers listen on loopback only; returns the store class now in use."""
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend

    base = dist.TCPStore
    if getattr(base, "_radio_loopback", False):
        return base

    class LoopbackTCPStore(base):  # type: ignore[misc, valid-type]
        _radio_loopback = True

        def __init__(self, host_name, port, world_size=None, is_master=False, timeout=timedelta(seconds=300),
                     wait_for_workers=True, multi_tenant=False, master_listen_fd=None, use_libuv=True):
            if is_master and master_listen_fd is None:
                master_listen_fd, port = loopback_listener(int(port))
            super().__init__(host_name, port, world_size, is_master, timeout, wait_for_workers, multi_tenant,
                             master_listen_fd, use_libuv)

    dist.TCPStore = LoopbackTCPStore  # dynamic_rendezvous creates the ranks' shared store through dist.TCPStore
    c10d_rendezvous_backend.TCPStore = LoopbackTCPStore  # the rendezvous store (imported by name there)
    return LoopbackTCPStore


def main() -> None:
    install()
    from torch.distributed.run import main as torchrun

    torchrun()


if __name__ == "__main__":
    main()

"""Where a job's rendezvous listens: the store rank 0 serves, and gloo's connections.

torch's env:// rendezvous has rank 0's ``TCPStore`` listen on every interface (IPv4 and
IPv6) for the whole run, so any host that reaches the machine can join or disturb the
job. spd_ext's jobs bind it themselves: rank 0 binds the listening socket to the address
the job names and hands it to the store (``master_listen_fd``):

* a single-host job (``MASTER_ADDR`` a loopback name or address) listens on 127.0.0.1,
  and gloo's own connections use the loopback interface;
* a multi-host job listens on ``MASTER_ADDR`` only (it must be an address of rank 0's
  host), as the user named it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta
from typing import Any

from spd_ext.errors import UsageError

_LISTENERS: list[socket.socket] = []  # the stores serve on these descriptors: kept open


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bound_store(rank: int, world_size: int, host: str, port: int, timeout: float,
                bind_host: str | None = None) -> Any:
    """The job's ``TCPStore``: rank 0 serves it on ``bind_host`` (default: 127.0.0.1 for a
    loopback ``host``, else ``host`` itself) and port ``port``; every rank connects to
    ``host``. Raises ValueError naming the address when rank 0 cannot bind it."""
    import torch.distributed as dist

    if bind_host is None:
        bind_host = "127.0.0.1" if is_loopback(host) else host
    listener = None
    if rank == 0:
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                bind_host, port, type=socket.SOCK_STREAM)[0]
            listener = socket.socket(family, kind, proto)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(128)
        except OSError as exc:
            if listener is not None:
                listener.close()
            raise UsageError(
                f"rank 0 cannot listen for the rendezvous on {bind_host}:{port} "
                f"({exc.strerror or exc}); MASTER_ADDR must be an address of rank 0's host "
                "and MASTER_PORT a free port") from None
    connect_to = "127.0.0.1" if is_loopback(host) else host
    store = dist.TCPStore(connect_to, port, world_size, rank == 0, timedelta(seconds=timeout),
                          master_listen_fd=listener.fileno() if listener else None)
    if listener is not None:
        _LISTENERS.append(listener)
    return store


def init_launched_group(backend: str, timeout: float) -> None:
    """``init_process_group`` for a rank a launcher started (deepspeed, torchrun, by hand:
    RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment), its rendezvous bound
    as this module says, every collective bounded by ``timeout`` seconds (on this group and
    on every group created later without a timeout of its own)."""
    import torch.distributed as dist

    from spd_ext.comm.torch_private import set_default_group_timeout

    set_default_group_timeout(timedelta(seconds=timeout))  # the groups DeepSpeed creates too
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if is_loopback(host):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        # torchrun's agent already serves the store at MASTER_ADDR:MASTER_PORT, bound as
        # torchrun's own --rdzv-endpoint / --master-addr say; the ranks only connect
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        return
    store = bound_store(rank, world, host, port, timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))

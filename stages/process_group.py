"""Ray Train's torch process group, with its rendezvous store listening on the node's address only.

Ray Train's TorchConfig has torch's rank 0 start the TCPStore that the workers meet at, and torch binds that
server to every interface ("::"), with no setting for the address. A stage's local Ray lives on 127.0.0.1,
so train_dit's fit was the one thing in the pipeline listening beyond loopback. Here worker 0 binds the
listening socket itself, to its Ray node's address (127.0.0.1 locally, the node's own address on a cluster),
and hands it to the store; every worker then joins the group through that store. Everything else (gloo on
CPUs, NCCL on GPUs, the timeout, the teardown) is Ray Train's.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
# Private to Ray Train: there is no public hook between choosing the master and the rendezvous.
from ray.train.torch.config import _is_backend_nccl, _set_torch_distributed_env_vars, _TorchBackend

_bound: list[socket.socket] = []  # worker 0's listening socket, between the two calls Ray makes to it


def _listen() -> tuple[str, int]:
    address = ray.util.get_node_ip_address()
    sock = socket.create_server((address, 0))  # port 0: the OS picks a free one
    _bound.append(sock)
    return address, sock.getsockname()[1]


def _join(backend: str, address: str, port: int, world_rank: int, world_size: int, timeout_s: int) -> None:
    if _is_backend_nccl(backend):  # as Ray Train does: a collective that times out fails instead of hanging
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = datetime.timedelta(seconds=timeout_s)
    listen_fd = _bound.pop().detach() if world_rank == 0 else None  # the store takes the socket over
    store = dist.TCPStore(address, port, world_size, is_master=world_rank == 0, timeout=timeout,
                          wait_for_workers=False, master_listen_fd=listen_fd)
    dist.init_process_group(backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class _BoundStoreBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: BoundStoreTorchConfig) -> None:
        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")
        address, port = worker_group.execute_single(0, _listen)
        worker_group.execute(_set_torch_distributed_env_vars)
        world_size = len(worker_group)
        ray.get([worker_group.execute_single_async(rank, _join, backend=backend, address=address, port=port,
                                                   world_rank=rank, world_size=world_size,
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(world_size)])


@dataclass
class BoundStoreTorchConfig(TorchConfig):
    """TorchConfig whose rendezvous store listens on worker 0's node address, not on every interface."""

    @property
    def backend_cls(self):
        return _BoundStoreBackend

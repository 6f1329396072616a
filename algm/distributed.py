"""Evaluation and GFLOPs over several processes with ``torch.distributed`` (docs/distributed.md).

``torchrun`` starts one process per GPU (or per CPU share) and describes the group in
environment variables; :func:`init` joins it. A split is sharded with a stride
(rank r takes items r, r + world, r + 2 world, ...), so :func:`gather_in_order` can put
per-item results back in split order; confusion matrices are summed exactly (int64).
Without a process group every helper is the single-process identity: rank 0 of 1.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
from datetime import timedelta
from itertools import islice
from typing import Any, Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

T = TypeVar("T")

# Ranks wait at a collective while rank 0 alone measures throughput or trains a missing
# head (``algm-bench bench``), so the default 10-30 minute timeout is too short.
TIMEOUT = timedelta(hours=2)


def launched() -> bool:
    """True inside a process started by torchrun (or any launcher that sets its variables)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init() -> bool:
    """Join the process group torchrun describes; no-op outside torchrun or if already joined.

    Backend: gloo for CPU tensors and object collectives, plus nccl for CUDA tensors when
    CUDA is available (each process then uses ``cuda:LOCAL_RANK``). Returns True if a
    group of more than one process is in use."""
    if not dist.is_initialized() and launched():
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend, timeout=TIMEOUT)
        atexit.register(dist.destroy_process_group)
    return world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """True on the process that prints and writes files (rank 0)."""
    return rank() == 0


def device(name: str) -> torch.device:
    """``cuda`` without an index means this process's GPU (``cuda:LOCAL_RANK``) under torchrun."""
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None and launched():
        return torch.device("cuda", local_rank())
    return dev


def shard(items: Iterable[T]) -> Iterator[T]:
    """This rank's items: every ``world_size``-th one, starting at ``rank``."""
    return islice(items, rank(), None, world_size())


def gather_in_order(local: list[T]) -> list[T]:
    """Every rank's :func:`shard` results, back in the order of the unsharded items."""
    if world_size() == 1:
        return list(local)
    parts: list[list[T]] = [[] for _ in range(world_size())]
    dist.all_gather_object(parts, local)
    total = sum(len(p) for p in parts)
    return [parts[i % len(parts)][i // len(parts)] for i in range(total)]


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum of ``tensor`` over the ranks (a new tensor; exact for integer dtypes)."""
    out = tensor.clone()
    if world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_module(module: nn.Module) -> nn.Module:
    """Give every rank rank 0's parameters and buffers (in place), e.g. random weights."""
    if world_size() > 1:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)
    return module


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def launch(nproc: int, argv: list[str]) -> int:
    """Re-run ``algm-bench argv`` (with ``--nproc`` removed) as ``nproc`` processes via
    torchrun, the working directory kept off their ``sys.path``."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(nproc), "-m", "algm.cli", *args]
    # workers run ``python -m algm.cli``: without the working directory on sys.path, whose
    # suites/ or baselines/ folder would shadow the packages (algm.shadowing)
    with _environment(PYTHONSAFEPATH="1"):
        return subprocess.run(cmd).returncode


@contextlib.contextmanager
def _environment(**variables: str) -> Iterator[None]:
    """``os.environ`` with ``variables`` set (children inherit them), restored afterwards."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

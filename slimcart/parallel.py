"""Data parallelism for the distillation trainer, on plain torch.distributed.

Each global batch is split across ranks; every rank scales its shard's mean loss by
shard/global size, and gradients are summed with one all-reduce, so N processes take exactly
the optimizer step one process would take on the whole batch (up to float summation order).
Rank 0 validates, checkpoints and decides early stopping; the decision is broadcast.

Two ways in: `torchrun --nproc_per_node N your_script.py` (call `init_from_env()` first, then
`Trainer.fit`), or `spawn(fn, world_size)` from inside one Python process (what the `distill`
recipe step does when `train.world_size > 1`). gloo on CPU, nccl when CUDA is available.
"""
from __future__ import annotations

import os
import pickle
import socket
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_env() -> bool:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/MASTER_ADDR env); False if not launched so."""
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init_process_group(backend())
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def shard(indices: np.ndarray) -> np.ndarray:
    """This rank's contiguous slice of a global batch (sizes differ by at most one)."""
    return np.array_split(indices, world_size())[rank()]


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum gradients over ranks in one flat buffer (ranks' losses are already scaled to the global batch)."""
    if world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value of a small picklable object, on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, world: int, port: int, threads: int, fn: Callable, payload: bytes) -> None:
    torch.set_num_threads(threads)
    args = pickle.loads(payload)
    dist.init_process_group(backend(), init_method=f"tcp://127.0.0.1:{port}", rank=local_rank, world_size=world)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world: int, args: tuple = (), threads_per_rank: int | None = None) -> None:
    """Run `fn(*args)` in `world` fresh processes joined into one process group on this machine.

    `fn` and `args` are pickled to the children (fn must be a module-level function); results
    come back through files `fn` writes (rank 0 writes the trained weights).
    """
    import torch.multiprocessing as mp

    threads = threads_per_rank or max(1, torch.get_num_threads() // world)
    # Plain pickle, not torch.multiprocessing's: that one moves tensors to shared memory, and every
    # rank would then update the same parameter storage.
    payload = pickle.dumps(args)
    mp.spawn(_worker, args=(world, _free_port(), threads, fn, payload), nprocs=world, join=True)

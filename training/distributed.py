"""Data-parallel training across processes on torch.distributed (the engine accelerate and torchrun launch).

Inside ComfyUI, and in a plain ``python -m comfy_finetune run``, nothing here is active: :func:`world_size` is 1,
every hook below returns at once, and no process group exists. Data parallelism starts only when the headless
runner is launched as several ranks - by ``accelerate launch --multi_gpu --num_processes N -m comfy_finetune run
WF.json``, by ``torchrun --nproc-per-node N -m comfy_finetune run WF.json``, or by the runner's own
``--processes N`` (which starts torchrun itself) - and calls :func:`init_from_env`. Those launchers set ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; mpirun's ``PMI_*`` / ``OMPI_COMM_WORLD_*``
variables are read too. The backend is NCCL when CUDA is available (each rank on GPU ``LOCAL_RANK``), else gloo.

What a run means does not change with the number of processes:

* ``batch_size`` is the **global** batch. Every rank walks the same global batch sequence as a single-process
  run and takes its own slice (:func:`shard_batch`): rank ``r`` of ``W`` gets samples ``[r*b, (r+1)*b)`` of each
  global batch, ``b = batch_size / W`` (which must divide evenly).
* Per-sample randomness (noise, timesteps, offset noise, prompt templates) is drawn for the whole global batch on
  every rank and sliced (:func:`randn`, :func:`randint`, :func:`span`), so each sample gets exactly the noise it
  gets in the single-process run.
* Gradients of the trainable tensors are averaged over the ranks once per optimizer step, after the last
  micro-step of gradient accumulation (:func:`all_reduce_grads`); every rank then takes the same optimizer step
  from the same state (made identical at the start by :func:`broadcast_`), so the weights stay bit-identical.
  The losses are averaged too (:func:`mean`), so the NaN check takes the same branch on every rank.
* Only rank 0 writes files (checkpoints, saved models, images: :func:`writes_allowed`), shows progress and sends
  events; the other ranks compute the same result and return it.

So one optimizer step on 2 ranks x ``batch_size`` 2 equals one step on 1 rank x ``batch_size`` 2, up to the
float rounding of the all-reduce (``tests/test_distributed.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core import atomic
from ..core.errors import FinetuneError

log = logging.getLogger("comfy_finetune")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = ""


_SINGLE = World()
_world: World = _SINGLE      # set by init_from_env only: a process group someone else made is never used
_sharding = False            # True while the loop computes a loss: per-sample draws cover the global batch


def _env_int(names: Sequence[str], default: int) -> int:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise FinetuneError(f"the environment variable {name}={value!r} is not a whole number",
                                    input=name, fix="launch with accelerate launch, torchrun or --processes") \
                    from None
    return default


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as the launcher set them; (0, 1, 0) without a launcher."""
    size = _env_int(("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"), 1)
    rank = _env_int(("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"), 0)
    local = _env_int(("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK"),
                     rank)
    return rank, size, local


def init_from_env() -> World:
    """Join the process group the launcher describes (a no-op for a single process). Returns this rank's World."""
    global _world
    rank, size, local = env_world()
    if size <= 1:
        _world = _SINGLE
        return _world
    if not 0 <= rank < size:
        raise FinetuneError(f"RANK {rank} is outside WORLD_SIZE {size}", input="RANK",
                            fix="launch with accelerate launch, torchrun or --processes")
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_available():
        raise FinetuneError("this PyTorch build has no torch.distributed", input="WORLD_SIZE",
                            fix="install a PyTorch build with distributed support, or run one process")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # mpirun does not set them; accelerate's defaults
    os.environ.setdefault("MASTER_PORT", "29500")
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local % max(1, torch.cuda.device_count()))
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=size,
                                timeout=datetime.timedelta(minutes=30))
    _world = World(rank, size, local, backend)
    log.info("data-parallel rank %d of %d (%s)", rank, size, backend)
    return _world


def shutdown() -> None:
    """Leave the process group (if this module joined one)."""
    global _world
    if _world.size > 1:
        import torch.distributed as dist  # noqa: PLC0415

        if dist.is_initialized():
            dist.destroy_process_group()
    _world = _SINGLE


def world() -> World:
    return _world


def world_size() -> int:
    return _world.size


def rank() -> int:
    return _world.rank


def is_main() -> bool:
    return _world.rank == 0


def active() -> bool:
    return _world.size > 1


def writes_allowed() -> bool:
    """Files (checkpoints, models, images) are written by rank 0 only."""
    return _world.rank == 0


atomic.set_write_gate(writes_allowed)  # every file the pack writes goes through core.atomic, which asks this


# ---------------------------------------------------------------------------------------------- batches
def local_batch_size(batch_size: int, *, node: str) -> int:
    """This rank's share of the global ``batch_size``; refuses a batch that does not split evenly."""
    size = _world.size
    if size == 1:
        return int(batch_size)
    if batch_size % size:
        lower, upper = (batch_size // size) * size, (batch_size // size + 1) * size
        options = f"{lower} or {upper}" if lower else f"{upper}"
        raise FinetuneError(f"batch_size {batch_size} cannot be split evenly over {size} processes (batch_size is "
                            f"the global batch; each process trains batch_size / {size} images per step)",
                            node=node, input="batch_size", fix=f"use batch_size {options}")
    return batch_size // size


def _batch_len(obj: Any) -> int | None:
    if isinstance(obj, torch.Tensor) and obj.dim() > 0:
        return int(obj.shape[0])
    if isinstance(obj, (list, tuple)):
        return len(obj)
    return None


def shard_batch(batch: Any, global_size: int) -> Any:
    """This rank's slice of a global batch: every list/tensor field of length ``global_size`` is cut to
    ``[rank*b, (rank+1)*b)``; nested dataclasses (DreamBooth's instance + class batches) are cut the same way."""
    if _world.size == 1 or batch is None:
        return batch
    b = global_size // _world.size
    lo, hi = _world.rank * b, (_world.rank + 1) * b
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {}
        for f in dataclasses.fields(batch):
            value = getattr(batch, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                changes[f.name] = shard_batch(value, global_size)
            elif _batch_len(value) == global_size:
                changes[f.name] = value[lo:hi] if not isinstance(value, tuple) else tuple(value[lo:hi])
        return dataclasses.replace(batch, **changes) if changes else batch
    if _batch_len(batch) == global_size:
        return batch[lo:hi]
    raise TypeError(f"cannot split a {type(batch).__name__} over processes")


# ---------------------------------------------------------------------------------------------- randomness
@contextlib.contextmanager
def sharded_draws() -> Iterator[None]:
    """While active, :func:`span` maps this rank's samples into the global batch (the loop wraps each loss)."""
    global _sharding
    before, _sharding = _sharding, _world.size > 1
    try:
        yield
    finally:
        _sharding = before


def span(local: int) -> tuple[int, int]:
    """(global count, this rank's offset) for a per-sample draw of ``local`` items; (local, 0) when not sharded."""
    if not _sharding:
        return local, 0
    return local * _world.size, local * _world.rank


def randn(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """``torch.randn(shape, generator)`` for this rank's rows of the global batch (dim 0 is the batch)."""
    n, off = span(int(shape[0]))
    return torch.randn((n, *shape[1:]), generator=generator)[off:off + int(shape[0])]


def randint(high: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``torch.randint(0, high, (count,), generator)`` for this rank's rows of the global batch."""
    n, off = span(int(count))
    return torch.randint(0, high, (n,), generator=generator)[off:off + int(count)]


def per_sample(count: int, draw) -> list:
    """``[draw() for each sample]`` for this rank's samples, drawing for the whole global batch in order."""
    n, off = span(int(count))
    values = [draw() for _ in range(n)]
    return values[off:off + int(count)]


# ---------------------------------------------------------------------------------------------- collectives
def mean(value: float, device: torch.device) -> float:
    """The mean of ``value`` over the ranks (NaN anywhere gives NaN everywhere); ``value`` itself when alone."""
    if _world.size == 1:
        return value
    import torch.distributed as dist  # noqa: PLC0415

    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(t)
    return float(t.item()) / _world.size


def _comm_device(device: torch.device) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if _world.backend == "nccl" else torch.device("cpu")


def all_reduce_grads(params: Sequence[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over the ranks, in place, with one all-reduce per dtype/device.

    A parameter without a gradient on some rank gets zeros there if any other rank has one (so every rank's
    optimizer sees the same set of gradients); one no rank has stays ``None``.
    """
    if _world.size == 1 or not params:
        return
    import torch.distributed as dist  # noqa: PLC0415

    comm = _comm_device(params[0].device)
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=comm)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p, flag in zip(params, has.tolist()):
        if not flag:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for (_, dev), members in groups.items():
        flat = torch.cat([p.grad.reshape(-1) for p in members])
        moved = flat.to(comm) if flat.device != comm else flat
        dist.all_reduce(moved)
        moved.div_(_world.size)
        flat = moved.to(dev) if moved.device != dev else moved
        offset = 0
        for p in members:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


@torch.no_grad()
def broadcast_(tensors: Sequence[torch.Tensor]) -> None:
    """Copy rank 0's values of ``tensors`` into every rank's (in place)."""
    if _world.size == 1:
        return
    import torch.distributed as dist  # noqa: PLC0415

    for t in tensors:
        comm = _comm_device(t.device)
        buf = t.detach().to(comm) if t.device != comm else t.detach()
        dist.broadcast(buf, src=0)
        if buf is not t:
            t.copy_(buf)


def barrier() -> None:
    if _world.size > 1:
        import torch.distributed as dist  # noqa: PLC0415

        dist.barrier()

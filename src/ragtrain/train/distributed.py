"""Rank helpers: route queries to rank 0's index and back, slice the KB for encoding, gather objects.

Everything here degrades to a direct call in a single process.  Collectives are plain ``torch.distributed``
(``all_gather``/``broadcast``) so they work on NCCL and on gloo (CPU hosts); a dead rank surfaces as the process
group's timeout error (``train.process_group_timeout_s``), never as a silent hang.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world() -> int:
    return dist.get_world_size() if is_dist() else 1


def _comm_device(t: torch.Tensor) -> torch.device:
    # NCCL needs CUDA tensors; gloo needs CPU tensors
    return t.device if dist.get_backend() != "gloo" else torch.device("cpu")


def gather_rows(t: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """All-gather tensors whose first dimension differs per rank; returns (concatenation, sizes)."""
    if not is_dist():
        return t, [t.shape[0]]
    dev = _comm_device(t)
    size = torch.tensor([t.shape[0]], device=dev)
    sizes = [torch.zeros_like(size) for _ in range(world())]
    dist.all_gather(sizes, size)
    sizes_i = [int(s.item()) for s in sizes]
    m = max(sizes_i)
    padded = torch.zeros((m, *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t.to(dev)
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes_i)]), sizes_i


def rank0_compute(fn: Callable[[dict], dict], inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gather ``inputs`` (same leading batch dim per rank) from all ranks, run ``fn`` on rank 0 over the whole
    global batch (one batched call, e.g. one FAISS search), broadcast the outputs and return this rank's rows.

    ``fn`` receives and returns dicts of CPU tensors whose leading dimension is the global batch size."""
    if not is_dist():
        return fn({k: v.cpu() for k, v in inputs.items()})
    gathered, sizes = {}, []
    for key in sorted(inputs):
        gathered[key], sizes = gather_rows(inputs[key])
    start = sum(sizes[: rank()])
    stop = start + sizes[rank()]
    outputs = fn({k: v.cpu() for k, v in gathered.items()}) if rank() == 0 else None
    # broadcast the structure (names, shapes, dtypes) then the tensors
    meta = [None]
    if rank() == 0:
        meta = [[(k, tuple(v.shape), v.dtype) for k, v in sorted(outputs.items())]]
    dist.broadcast_object_list(meta, src=0)
    ref = next(iter(inputs.values()))
    dev = _comm_device(ref)
    result = {}
    for key, shape, dtype in meta[0]:
        buf = outputs[key].to(dev).contiguous() if rank() == 0 else torch.empty(shape, dtype=dtype, device=dev)
        dist.broadcast(buf, src=0)
        result[key] = buf[start:stop].cpu()
    return result


def equal_slices(n: int, n_ranks: int, batch_size: int) -> list[range]:
    """Split ``range(n)`` into one contiguous slice per rank with the SAME number of batches each (the last
    ranks may hold fewer rows; callers pad their last batches), so every rank calls a ZeRO-3 partitioned encoder
    the same number of times."""
    per_rank = math.ceil(n / n_ranks)
    per_rank = math.ceil(per_rank / batch_size) * batch_size
    return [range(min(r * per_rank, n), min((r + 1) * per_rank, n)) for r in range(n_ranks)]


def n_batches(n: int, n_ranks: int, batch_size: int) -> int:
    return math.ceil(math.ceil(n / n_ranks) / batch_size)


def gather_objects(obj) -> list:
    """All-gather picklable objects (one per rank, in rank order)."""
    if not is_dist():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_dist():
        dist.barrier()

"""Process-group set-up, rank helpers, the cross-rank gather used by the loss and a resumable sampler.

Nothing here touches ``torch.distributed`` at import time. :func:`init_distributed` supports
``torchrun`` (``LOCAL_RANK``/``RANK``/``WORLD_SIZE`` in the environment), the older
``python -m torch.distributed.launch`` (``--local_rank``/``--local-rank`` on the command line) and a
plain single process without any launcher.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

logger = logging.getLogger(__name__)

# Default process-group timeouts in seconds. A collective that waits longer raises, so a rank that
# hangs ends the job instead of blocking it forever. gloo runs on CPUs, where every rank starts its
# first step at about the same time. NCCL runs get longer because the first step can include minutes
# of torch.compile work that differ from rank to rank.
DEFAULT_TIMEOUT_S = {"gloo": 300.0, "nccl": 1800.0}
# Ranks that wait while rank 0 alone evaluates or writes a checkpoint wait in a separate gloo group
# with this timeout, so a long evaluation does not trip the training timeout.
DEFAULT_WAIT_TIMEOUT_S = 7200.0

_wait_group: Optional[Any] = None


@dataclass
class DistInfo:
    """Placement of this process: its ranks, the world size, its device and the backend."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def init_distributed(
    local_rank: Optional[int] = None,
    device: str = "auto",
    timeout_s: Optional[float] = None,
    wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
) -> DistInfo:
    """Initialise the default process group when a launcher started this process.

    Args:
        local_rank: the value of ``--local_rank`` passed by ``torch.distributed.launch``; the
            ``LOCAL_RANK`` environment variable (torchrun) takes precedence.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cuda"`` or ``"cpu"``.
        timeout_s: process-group timeout in seconds; a collective that waits longer raises. None
            selects :data:`DEFAULT_TIMEOUT_S` of the backend.
        wait_timeout_s: timeout in seconds of :func:`wait_for_main`, :func:`broadcast_object` and
            :func:`all_gather_object`, the calls in which ranks wait for work done by rank 0 alone.

    Returns:
        The :class:`DistInfo` of this process. Without ``WORLD_SIZE`` > 1 in the environment no
        process group is created.
    """
    env_local_rank = _env_int("LOCAL_RANK")
    if env_local_rank is not None:
        local_rank = env_local_rank
    local_rank = local_rank or 0
    world_size = _env_int("WORLD_SIZE") or 1
    rank = _env_int("RANK") or 0

    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but CUDA is not available; use --device cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")

    if world_size == 1:
        return DistInfo(0, local_rank, 1, torch_device, None)

    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise RuntimeError(
            "WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set; start the job with torchrun "
            "or python -m torch.distributed.launch"
        )
    backend = "nccl" if use_cuda else "gloo"
    if timeout_s is None:
        timeout_s = DEFAULT_TIMEOUT_S[backend]
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        world_size=world_size,
        rank=rank,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    global _wait_group
    _wait_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=wait_timeout_s))
    logger.info("process group: %s, rank %d of %d, timeout %.0f s (waits for rank 0: %.0f s)", backend, rank,
                world_size, timeout_s, wait_timeout_s)
    return DistInfo(rank, local_rank, world_size, torch_device, backend)


def cleanup_distributed() -> None:
    """Destroy the default process group if one exists."""
    global _wait_group
    _wait_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def wait_for_main() -> None:
    """Block every rank until all arrive, with the long timeout of the waiting group.

    Call it after work that rank 0 does alone (writing a checkpoint), so that the other ranks do not
    hit the training timeout in their next collective while rank 0 is still busy.
    """
    if get_world_size() > 1:
        dist.barrier(group=_wait_group)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return ``obj`` from rank ``src`` on every rank (a no-op in a single process).

    The broadcast runs in the gloo group with the long wait timeout, because it carries results
    that rank ``src`` computes alone (an evaluation, a check of the feature files) while the other
    ranks wait. A rank that dies still ends the wait at once, because gloo reports the closed
    connection. Only a rank that hangs is detected as late as the wait timeout.
    """
    if get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=_wait_group)
    return holder[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Return the list of ``obj`` from every rank, indexed by rank (``[obj]`` in a single process)."""
    if get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj, group=_wait_group)
    return gathered


class ResumableDistributedSampler(DistributedSampler):
    """A :class:`DistributedSampler` that can start an epoch after its first ``N`` batches.

    Rank ``r`` of ``W`` takes positions ``r, r + W, ...`` of the epoch's permutation, so the first
    ``k`` local batches of every rank together cover the first ``k * B`` positions (``B`` the global
    batch), whatever ``W`` is. Skipping ``k * B / W`` indices on each rank therefore resumes at
    global batch ``k``, and every rank keeps the same number of remaining indices. The skipped
    items are never loaded.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip = 0

    def set_skip(self, num_indices: int) -> None:
        """Skip the first ``num_indices`` indices of this rank in the coming epochs (0 resets)."""
        if num_indices < 0:
            raise ValueError(f"num_indices must be non-negative, got {num_indices}")
        self.skip = num_indices

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip:])

    def __len__(self) -> int:
        return max(self.num_samples - self.skip, 0)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums each slice's gradient over ranks.

    ``torch.distributed.nn.functional.all_gather`` is not used because, on gloo, its backward
    scatters into buffers that copy the strides of non-contiguous gradients, which returned
    wrong gradients for the text tokens (torch 2.14).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        ctx.rank = dist.get_rank()
        ctx.local_batch = tensor.shape[0]
        chunks = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(chunks, tensor)
        return torch.cat(chunks, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            local = torch.empty((ctx.local_batch,) + grad.shape[1:], dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(local, grad, op=dist.ReduceOp.SUM)
            return local
        # gloo has no reduce-scatter: sum the whole gradient, then keep this rank's slice.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.local_batch
        return grad[start:start + ctx.local_batch].clone()


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [B_local, ...] from all ranks along dim 0, keeping gradients.

    The backward pass sums, for every rank's slice, the gradients that all ranks computed for it
    and returns that sum to the owning rank. If every rank computes the same global loss L,
    each rank's parameter gradient is ``world_size * dL/dtheta``; DDP's gradient averaging then
    divides by ``world_size``, so the applied gradient equals that of one process on the global
    batch. Every rank must pass the same shape.
    """
    if get_world_size() == 1:
        return tensor
    if not tensor.requires_grad:
        chunks = [torch.empty_like(tensor) for _ in range(get_world_size())]
        dist.all_gather(chunks, tensor.contiguous())
        return torch.cat(chunks, dim=0)
    return _GatherWithGrad.apply(tensor)


def gather_outputs(outputs: Any) -> Any:
    """Apply :func:`all_gather_with_grad` to every batched tensor of a nested dict.

    Zero-dimensional tensors (such as ``logit_scale``) are shared parameters and pass through.
    """
    if isinstance(outputs, dict):
        return {key: gather_outputs(value) for key, value in outputs.items()}
    if isinstance(outputs, torch.Tensor) and outputs.dim() > 0:
        return all_gather_with_grad(outputs)
    return outputs


def reduce_mean(value: float, device: torch.device) -> float:
    """Return the mean of a Python number over all ranks."""
    if get_world_size() == 1:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / get_world_size()

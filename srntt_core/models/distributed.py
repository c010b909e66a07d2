"""Several processes (``torchrun``) on torch.distributed: environment, process group, sharding.

A command runs as one process when none of torchrun's variables (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) is set, and joins a process group when all of them are; a
partly set environment is an error naming what is missing. The backend is ``nccl`` when the
device is a GPU (each rank takes ``cuda:LOCAL_RANK``) and ``gloo`` on the CPU.

Training data is defined per global sample, not per rank: global sample ``k`` (counted over
the whole run, whatever the world size) is item ``perm_e[k mod N]`` of the permutation of
epoch ``e = k // N`` (seeded by (seed, e), like ``DistributedSampler.set_epoch``), cropped
with a generator seeded by (seed, k). A step of global batch ``B`` consumes samples
``[s, s + B)``; rank ``r`` of ``W`` takes ``[s + r B/W, s + (r + 1) B/W)``. A run therefore
resumes at the same data position with another world size.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 1800.0


class DistributedError(RuntimeError):
    """A rank failed or could not be reached; the message says which step and how to resume."""


@dataclass(frozen=True)
class Context:
    """This process's place in the job; ``world_size == 1`` without a process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.backend is not None

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def any(self, flags: Sequence[bool]) -> list[bool]:
        """Element-wise OR of ``flags`` over the ranks (every rank gets the same answer)."""
        if not self.distributed:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=self._comm_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Mean over the ranks of each value (every rank holds the same keys)."""
        if not self.distributed or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(t)
        return {k: v / self.world_size for k, v in zip(keys, t.tolist(), strict=True)}

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (any picklable object)."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def shard(self, items: Sequence) -> list:
        """This rank's share: items ``rank, rank + W, ...`` (disjoint, together all of them)."""
        return list(items[self.rank::self.world_size])

    def _comm_device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def env_world() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's variables, or None when none is set."""
    present = [k for k in ENV_KEYS if os.environ.get(k)]
    if not present:
        return None
    missing = [k for k in ENV_KEYS if k not in present]
    if missing:
        raise ValueError(
            f"distributed environment half set: {', '.join(f'{k}={os.environ[k]}' for k in present)} "
            f"but {', '.join(missing)} not; launch with torchrun (it sets all of {', '.join(ENV_KEYS)}) "
            "or unset them for one process")
    values = {}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        text = os.environ.get(k, "0")
        try:
            values[k] = int(text)
        except ValueError:
            raise ValueError(f"distributed environment: {k}={text!r} is not an integer") from None
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"distributed environment: RANK={rank} must be in [0, WORLD_SIZE={world})")
    if not 0 < values["MASTER_PORT"] < 65536:
        raise ValueError(f"distributed environment: MASTER_PORT={values['MASTER_PORT']} is not a port")
    return rank, world, local


def resolve(device: str, local_rank: int, world: tuple[int, int, int] | None) -> torch.device:
    """The device of this rank: ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK`` under torchrun."""
    from .infer import resolve_device

    dev = resolve_device(device)
    if world is not None and dev.type == "cuda" and dev.index is None:
        dev = resolve_device(f"cuda:{local_rank}")
    return dev


@contextlib.contextmanager
def session(device: str = "auto",
            timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[tuple[Context, torch.device]]:
    """Join the process group the environment describes (if any) for the duration of the block.

    Yields ``(context, device)``. A process joins its job once: the group this call creates
    stays for the later commands of the process (a second rendezvous on the same address would
    not meet the other ranks) and is destroyed at exit.
    """
    if not (isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool) and timeout_s > 0):
        raise ValueError(f"dist_timeout: expected seconds > 0, got {timeout_s!r}")
    world = env_world()
    if world is None:
        yield Context(), resolve(device, 0, None)
        return
    rank, size, local = world
    dev = resolve(device, local, world)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch.distributed.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_s),
                                             device_id=dev if dev.type == "cuda" else None)
        atexit.register(_destroy)
    else:
        backend = torch.distributed.get_backend()
        rank, size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    yield Context(rank, size, local, backend), dev


def _destroy() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# training data by global sample

def _mix(seed: int, k: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + k * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


class GlobalSampler:
    """Items and crop generators of global samples (module docstring): the same for every rank."""

    def __init__(self, n_items: int, seed: int):
        if n_items < 1:
            raise ValueError(f"n_items: need at least one training item, got {n_items}")
        self.n, self.seed = n_items, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def item(self, k: int) -> tuple[int, torch.Generator]:
        epoch, pos = divmod(k, self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, -1 - epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return int(self._perm[pos]), torch.Generator().manual_seed(_mix(self.seed, k))

    def batch(self, data, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Global samples ``[start, start + count)`` of ``data`` (a
        :class:`~srntt_core.models.data.TrainCrops`)."""
        parts = [data.item(*self.item(k)) for k in range(start, start + count)]
        return tuple(torch.stack(t) for t in zip(*parts, strict=True))


def rank_slice(global_batch: int, ctx: Context) -> tuple[int, int]:
    """``(offset, count)`` of this rank's samples in a global batch (equal shares)."""
    if global_batch % ctx.world_size:
        raise ValueError(f"batch: the global batch {global_batch} must be a multiple of the world size "
                         f"{ctx.world_size} (each rank takes batch / world size)")
    per = global_batch // ctx.world_size
    return ctx.rank * per, per


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the global torch RNG for (run seed, global step, rank): random draws inside a
    step (the WGAN-GP interpolation) do not depend on what ran before a resume."""
    return _mix(seed, (step << 16) + rank) % (2**31)


# ---------------------------------------------------------------------------------------------
# optional TensorBoard

def tensorboard_writer(folder):
    """A ``SummaryWriter`` on ``folder``, or None when TensorBoard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))

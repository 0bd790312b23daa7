"""The experiment runner: units of work made of shards, resumable, dealt to ``torchrun`` ranks, then scored.

Every experiment of pagkit (``pagkit eval``'s sweeps, tune's rungs, ``pagkit restore --test-images``) is a
``Task``: a list of units (a sweep's configurations, a restoration's methods), each made of shards. The task
says what is particular to it: its units and their names, how one shard is made, how a finished unit is scored,
and what is rebuilt from the finished rows (tables, grids). The runner does the rest, the same way for all:

    OUT/shards/<unit>/<k>.safetensors   shard k of a unit (atomic; metadata: seconds, the time making it took)
    OUT/results/<unit>.json             a finished unit, written once all its shards exist

* Resumable: a shard or a result on disk is finished. A killed run, run again, makes only what is missing, and
  a finished unit is never redone. Everything is written through ``pagkit.io`` (atomic: a kill leaves the old
  file or the new one, never half of one).
* Seeds: shard k of seed set s draws from one generator seeded 1_000_003·s + k (``generator``), the same for
  every unit, so that units are compared on the same draws.
* Ranks: under ``torchrun`` the missing shards are dealt to ranks (gloo on CPU, nccl on GPUs); rank 0 holds
  OUT's lock for the whole world (``world_lock``) and scores once every shard exists, so the numbers do not
  depend on how many processes made them.
* ``max_new_shards``: stop after that many new shards (a "kill", for tests).
* Claims: what made a folder's results is recorded beside them (``claim``); another run's are refused, never
  mixed in.
"""
from __future__ import annotations

import os
import re
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from . import io

SEED_STRIDE = 1_000_003  # shard k of seed set s and shard k' of s' share no seed while k, k' < it


def generator(seed_set: int, k: int) -> torch.Generator:
    """The generator of shard ``k`` of seed set ``seed_set`` (CPU): the same for every unit of a run."""
    return torch.Generator().manual_seed(SEED_STRIDE * seed_set + k)


def safe_name(text: str) -> str:
    """``text`` as a file name: every character but letters, digits and ``. + _ -`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", text)


class Stopwatch:
    """``with Stopwatch() as clock: ...``, then ``clock.seconds``: the time a shard's metadata records."""

    seconds: float = float("nan")

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start


def claim(path: str | Path, record: dict, refusal: Callable[[dict], str]) -> None:
    """Record what makes a folder's results in ``path`` (``io.claim``); where another record is there, refuse
    with ``ValueError(refusal(old))``: results made one way are never mixed with results made another."""
    old = io.claim(path, record)
    if old is not None:
        raise ValueError(refusal(old))


class Task:
    """One experiment on the runner (see the module docstring). Subclasses give:

    ``units()`` (in order), ``key(unit)`` (its file name), ``num_shards(unit)``, ``make_shard(unit, k)``
    (draws with ``generator`` and saves with ``save_shard``), ``write_result(unit)`` (scores a unit whose
    shards all exist and writes ``result_path(unit)``) and ``finish()`` (rank 0, after the results: rebuild the
    tables; returns the rows). Optional: ``prepare()`` (inside OUT's lock, before any shard: claims, checks),
    ``shards()`` (the order shards are made in), ``failures`` with ``failed_result``.

    The attributes ``out``, ``max_new_shards`` and ``progress`` are the task's (dataclass fields of subclasses).
    """

    out: Path
    max_new_shards: int | None = None
    progress: bool = True
    distributed = True  # deal shards to torchrun ranks (False: one process makes all, as a plain run)
    # errors that end a unit (not the run): recorded as its result, ``failed_result(unit, err)``, never scored
    failures: tuple[type[BaseException], ...] = ()

    def units(self) -> list:
        raise NotImplementedError

    def key(self, unit) -> str:
        raise NotImplementedError

    def num_shards(self, unit) -> int:
        raise NotImplementedError

    def make_shard(self, unit, k: int) -> None:
        raise NotImplementedError

    def write_result(self, unit) -> None:
        raise NotImplementedError

    def finish(self) -> list[dict]:
        raise NotImplementedError

    def prepare(self) -> None:
        pass

    def failed_result(self, unit, err: BaseException) -> dict:
        raise NotImplementedError

    def progress_label(self, rank: int) -> str:
        return f"shards (rank {rank})"

    # --- the layout -----------------------------------------------------------------------------------
    def shard_folder(self, unit) -> Path:
        return self.out / "shards" / self.key(unit)

    def shard_path(self, unit, k: int) -> Path:
        return self.shard_folder(unit) / f"{k:05d}.safetensors"

    def result_path(self, unit) -> Path:
        return self.out / "results" / f"{self.key(unit)}.json"

    def shards(self) -> list[tuple]:
        """Every (unit, k), in the order they are made: unit by unit."""
        return [(unit, k) for unit in self.units() for k in range(self.num_shards(unit))]

    def save_shard(self, unit, k: int, tensors: dict[str, torch.Tensor], seconds: float) -> None:
        io.save_tensors(self.shard_path(unit, k), tensors, metadata={"seconds": f"{seconds:.4f}"})

    def unit_images(self, unit, ks=None) -> torch.Tensor:
        """The ``images`` of a unit's shards ``ks`` (default: all), concatenated."""
        ks = range(self.num_shards(unit)) if ks is None else ks
        return torch.cat([io.load_tensors(self.shard_path(unit, k))["images"] for k in ks])

    def unit_seconds(self, unit) -> float:
        """The seconds all shards of a unit took to make (from their metadata)."""
        return sum(io.shard_seconds(self.shard_path(unit, k)) for k in range(self.num_shards(unit)))

    def run(self) -> list[dict]:
        return run(self)


def run(task: Task) -> list[dict]:
    """Make every missing shard (this rank's share), then (rank 0) score every unfinished unit and ``finish``.

    One run at a time per ``task.out``: rank 0 takes ``io.run_lock(out)`` before the other ranks pass the first
    barrier (a second run, or a second torchrun world, on the same folder is refused). Returns the task's rows
    (empty on other ranks, and when ``max_new_shards`` stopped it)."""
    rank, world = rank_world() if task.distributed else (0, 1)
    with world_lock(task.out, rank, world):
        task.prepare()
        todo = [(unit, k) for unit, k in task.shards()
                if not task.result_path(unit).is_file() and not task.shard_path(unit, k).is_file()]
        made, failed = 0, set()
        for unit, k in tqdm(todo[rank::world], desc=task.progress_label(rank), disable=not task.progress):
            if task.max_new_shards is not None and made >= task.max_new_shards:
                print(f"stopping after {made} new shards (max_new_shards)")
                return []
            key = task.key(unit)
            if key in failed or task.result_path(unit).is_file():
                continue
            try:
                task.make_shard(unit, k)
            except task.failures as err:  # the unit is finished as failed, with the reason; the run goes on
                print(f"{key}: failed: {err}")
                io.write_json(task.result_path(unit), task.failed_result(unit, err))
                failed.add(key)
            made += 1
        barrier(world)
        if rank != 0:
            return []
        for unit in task.units():
            if not task.result_path(unit).is_file():
                task.write_result(unit)
        return task.finish()


# ---------------------------------------------------------------------------------------------- torchrun


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside ``torchrun``; inside, the process group is started."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


@contextmanager
def world_lock(folder: str | Path, rank: int, world: int) -> Iterator[None]:
    """Rank 0 holds ``io.run_lock(folder)`` for the whole torchrun world, and every rank learns whether it got
    it: a refusal ends every rank with the same ``RunLocked`` instead of leaving ranks 1.. at a barrier."""
    with ExitStack() as stack:
        refusal = None
        if rank == 0:
            try:
                stack.enter_context(io.run_lock(folder))
            except io.RunLocked as err:
                refusal = err
        refuse_together(refusal, rank, world, io.RunLocked)
        yield


def refuse_together(refusal: Exception | None, rank: int, world: int, kind: type[Exception] = ValueError) -> None:
    """Rank 0's ``refusal`` (None: none) raised on every rank (``kind`` with its message on the others), so
    that no rank is left waiting at a barrier for one that stopped."""
    message = broadcast_text(str(refusal) if refusal else "", rank, world)
    if refusal is not None:
        raise refusal
    if message:
        raise kind(message)


def broadcast_text(text: str, rank: int, world: int) -> str:
    """Rank 0's ``text`` on every rank (as bytes in a tensor: nothing is pickled)."""
    if world == 1:
        return text
    import torch.distributed as dist
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
    size = torch.tensor([data.numel()], device=device)
    dist.broadcast(size, 0)
    if rank != 0:
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    if size.item():
        dist.broadcast(data, 0)
    return bytes(data.cpu().tolist()).decode()


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist
        dist.barrier()

"""Data-parallel training: one process (rank) per GPU, or per CPU process with the gloo backend.

A run is started either by torchrun (`torchrun --nproc-per-node N -m retrocli train …`, which sets RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous address) or by `retro train --nproc N …`, which spawns the N
processes on this machine itself. Every rank builds the whole global batch of a step (a pure function of
seed and step) and keeps its own slice, so N ranks follow the data order of one process with the same
global batch, and a checkpoint from either resumes on the other.
"""

from __future__ import annotations

import datetime
import functools
import os
import queue
import socket
from dataclasses import dataclass

import torch

from retrocli.errors import RetroError
from retrocli.progress import NullProgress, RichProgress

INIT_TIMEOUT = datetime.timedelta(minutes=10)  # every rank loads the DB and neighbours before meeting


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def ranks_from_env() -> Ranks:
    """This process's place in a torchrun-style launch (RANK, WORLD_SIZE, LOCAL_RANK); one rank without."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise RetroError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise RetroError(f"RANK {rank} is not within WORLD_SIZE {world}")
    return Ranks(rank, world, local)


def rank_device(ranks: Ranks, device: torch.device) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK when training on CUDA, the CPU otherwise."""
    if not ranks.active or device.type == "cpu":
        return device
    if device.type != "cuda":
        raise RetroError(f"--device {device}: several ranks train on CUDA GPUs or on the CPU (gloo) only")
    if device.index not in (None, 0):
        raise RetroError(f"--device {device}: with several ranks each uses cuda:LOCAL_RANK; pass --device cuda")
    count = torch.cuda.device_count()
    if ranks.local_rank >= count:
        raise RetroError(f"rank {ranks.rank} needs cuda:{ranks.local_rank}, but this machine has {count} GPU(s)")
    return torch.device("cuda", ranks.local_rank)


def start(ranks: Ranks, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on the CPU) and return this rank's device."""
    import torch.distributed as dist

    where = rank_device(ranks, device)
    if not ranks.active or dist.is_initialized():
        return where
    if where.type == "cuda":
        torch.cuda.set_device(where)
    backend = "nccl" if where.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world, timeout=INIT_TIMEOUT,
                                device_id=where if where.type == "cuda" else None)
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RetroError(f"rank {ranks.rank}: cannot join the other ranks ({first})") from None
    return where


def stop() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def leaves_the_group(function):
    """Decorate a function that may call start(): the process group is left when it returns or fails."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        finally:
            stop()
    return wrapper


def barrier(ranks: Ranks) -> None:
    if ranks.active:
        import torch.distributed as dist

        dist.barrier()


def all_sum(values: list[float], ranks: Ranks, device: torch.device) -> list[float]:
    """The sum over ranks of each value (in float64, so token counts stay exact)."""
    if not ranks.active:
        return list(values)
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# -- `retro train --nproc N`: spawn the ranks on this machine -------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, threads: int | None, show_progress: bool, function,
               kwargs: dict, results) -> None:
    """One spawned rank: the torchrun environment, then function(progress=…, **kwargs); rank 0 reports
    what it returns."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # the ranks share this machine's cores unless told otherwise (torch would give each all of them)
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world))
    try:
        if rank == 0 and show_progress:
            from rich.console import Console

            with RichProgress(console=Console(stderr=True)) as progress:
                summary = function(progress=progress, **kwargs)
        else:
            summary = function(progress=NullProgress(), **kwargs)
    except RetroError as err:
        results.put(("error", rank, str(err)))
        raise SystemExit(2) from None
    if rank == 0:
        results.put(("ok", rank, summary))


def launch(function, nproc: int, threads: int | None = None, show_progress: bool = False, **kwargs) -> dict:
    """Run function(**kwargs) (a module-level function, such as retrocli.train.train) as `nproc` ranks on
    this machine; returns rank 0's result. If a rank fails, the others are stopped and its error is raised
    here as one line."""
    if nproc < 1:
        raise RetroError("--nproc: must be at least 1")
    if "WORLD_SIZE" in os.environ:
        raise RetroError("--nproc: already running under torchrun; pass one or the other")
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    results = context.SimpleQueue()
    port = _free_port()
    try:
        mp.start_processes(_rank_main, args=(nproc, port, threads, show_progress, function, kwargs, results),
                           nprocs=nproc, join=True, start_method="spawn")
    except mp.ProcessExitedException as err:
        messages = _drain(results)
        errors = [m for m in messages if m[0] == "error"]
        if errors:
            raise RetroError(errors[0][2]) from None
        raise RetroError(f"train: rank {err.error_index} exited with code {err.exit_code}") from None
    except mp.ProcessRaisedException as err:
        last = str(err).strip().splitlines()[-1] if str(err).strip() else "failed"
        raise RetroError(f"train: a rank failed ({last})") from None
    summaries = [m[2] for m in _drain(results) if m[0] == "ok"]
    if not summaries:
        raise RetroError("train: rank 0 finished without a summary")
    return summaries[0]


def _drain(results) -> list:
    out = []
    while True:
        try:
            if results.empty():
                return out
            out.append(results.get())
        except (OSError, EOFError, queue.Empty):
            return out

"""`--dask`: run the block-parallel stages (embed, index, batch neighbours, leakage overlap) on Dask.

Each stage already works in independent blocks whose results land in their own zarr chunk or index
file, and records finished blocks in its manifest. On a cluster the blocks become Dask tasks; only this
process (the client) writes the manifest, as each task reports back. A task whose worker dies is
rescheduled by Dask on another worker; because a block's output depends only on its inputs and is
written whole (one zarr chunk, or an index file renamed into place), a rerun overwrites it with the
same bytes, so a kill neither loses nor duplicates work. When Dask gives up on a task, the stage
stops with one line and a rerun resumes from the recorded blocks.

Workers must run the same retrocli version and reach a local DB at the same path (a shared filesystem);
a DB on object storage they reach themselves, each through a partial copy in its own cache (storage.py).
Dask moves task arguments and results with pickle over its own connections; nothing we write to disk
is pickled. Nothing here is imported unless --dask is given.

`run_on_devices` is the single-machine counterpart for `--devices`: one worker process per device.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from retrocli.errors import RetroError

LOCAL_PREFIX = "local:"


def import_distributed():
    try:
        import distributed
    except ImportError:
        raise RetroError("--dask needs dask.distributed: pip install 'retrocli[dask]'") from None
    return distributed


@contextlib.contextmanager
def dask_client(dask: Any) -> Iterator[Any]:
    """A `distributed.Client` for `dask`: None (no cluster), an existing Client (kept open), 'local:N'
    (a LocalCluster of N single-threaded worker processes, closed on exit) or a scheduler address."""
    if dask is None:
        yield None
        return
    distributed = import_distributed()
    if isinstance(dask, distributed.Client):
        yield dask
        return
    address = str(dask)
    if address.startswith(LOCAL_PREFIX):
        try:
            workers = int(address[len(LOCAL_PREFIX):])
        except ValueError:
            workers = 0
        if workers < 1:
            raise RetroError(f"--dask {address}: expected local:N with N ≥ 1 worker processes")
        cluster = distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
        )
        try:
            with distributed.Client(cluster) as client:
                yield client
        finally:
            cluster.close()
        return
    try:
        client = distributed.Client(address, timeout="20s")
    except (OSError, TimeoutError, ValueError) as err:
        raise RetroError(f"--dask {address}: cannot reach the Dask scheduler ({err})") from None
    with client:
        yield client


def run_blocks(
    client: Any, stage: str, function: Callable, args: tuple, blocks: Iterable[Any], max_blocks: int | None = None,
) -> Iterator[Any]:
    """Yield function(*args, block) for each block (a block number or a small payload): in this process
    in order when client is None, otherwise as Dask tasks in completion order. The caller records each
    result as it arrives."""
    blocks = list(blocks)
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    if client is None:
        for block in blocks:
            yield function(*args, block)
        return
    distributed = import_distributed()
    run = uuid.uuid4().hex[:8]
    futures = [client.submit(function, *args, block, pure=False, key=f"retro-{stage}-{i}-{run}")
               for i, block in enumerate(blocks)]
    try:
        for future in distributed.as_completed(futures):
            try:
                result = future.result()
            except distributed.KilledWorker as err:
                raise RetroError(
                    f"{stage}: Dask gave up on a task after its workers died ({err}); finished blocks are "
                    "recorded, rerun the same command to resume"
                ) from None
            except (asyncio.CancelledError, concurrent.futures.CancelledError, OSError) as err:
                where = "a task failed on a worker" if future.status == "error" else "lost the Dask cluster"
                raise RetroError(
                    f"{stage}: {where} ({type(err).__name__}: {err}); finished blocks are recorded, rerun the "
                    "same command to resume"
                ) from None
            yield result
    finally:
        client.cancel([f for f in futures if not f.done()])


# -- --devices: one worker process per device on this machine ---------------------------------------------

_WORKER_DEVICE: str | None = None


def worker_device(default: str) -> str:
    """The device this worker process was given by run_on_devices; `default` elsewhere."""
    return _WORKER_DEVICE or default


def _take_device(slots, threads: int | None) -> None:
    global _WORKER_DEVICE
    import torch

    _WORKER_DEVICE = slots.get()
    if threads:
        torch.set_num_threads(threads)


def run_on_devices(
    devices: list[str], stage: str, function: Callable, args: tuple, blocks: Iterable[Any],
    max_blocks: int | None = None, threads: int | None = None,
) -> Iterator[Any]:
    """Yield function(*args, block) for each block, run by one spawned worker process per device (in
    completion order); inside, worker_device() names the process's device. CPU devices share the cores
    (`threads` each, default cores / workers)."""
    import multiprocessing
    from concurrent.futures.process import BrokenProcessPool

    blocks = list(blocks)[:max_blocks] if max_blocks is not None else list(blocks)
    if not blocks:
        return
    if threads is None and all(d.startswith("cpu") for d in devices):
        threads = max(1, (os.cpu_count() or 1) // len(devices))
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    slots = context.Queue()
    for device in devices:
        slots.put(device)
    pool = concurrent.futures.ProcessPoolExecutor(len(devices), mp_context=context, initializer=_take_device,
                                                  initargs=(slots, threads))
    futures = [pool.submit(function, *args, block) for block in blocks]
    try:
        for future in concurrent.futures.as_completed(futures):
            try:
                yield future.result()
            except BrokenProcessPool:
                raise RetroError(
                    f"{stage}: a worker process died; finished blocks are recorded, rerun the same command to resume"
                ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

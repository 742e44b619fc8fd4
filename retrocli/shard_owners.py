"""Search on Dask with every index shard owned by one worker (or a few): no worker loads all of them.

At a billion chunks the HNSW graph is far larger than one worker's RAM, so `retro neighbors --dask` (and
the leakage report's search) never sends the whole index anywhere. Each shard is placed on `replicas`
workers; a block of queries goes to one live owner of every shard, each owner returns the per-shard
top-k of the shards it was asked for, and this process merges them with `merge_top_k`, the same exact
merge as the local search. The per-shard results are those of the same file searched with the same ef
and k, so the merged neighbours equal the single-process search.

A DB on object storage is not read through the client's cache: each owner fetches the manifest, the small
arrays and its own shards into its own cache (`--cache-dir`, or the worker's RETRO_CACHE_DIR), checked
against the manifest's sha256 before hnswlib sees them.

A worker that leaves the cluster (killed, or lost with its machine) is noticed within POLL_SECONDS:
its shards are placed on the live workers that own the fewest, and the requests it held are sent to
their new owners. A worker only ever loads the shards placed on it.
"""

from __future__ import annotations

import threading
from dataclasses import asdict
from typing import Any

import numpy as np

from retrocli.cluster import import_distributed
from retrocli.db import RetroDB, open_db
from retrocli.errors import RetroError
from retrocli.index import SearchWidth, ShardedIndex, VectorRows, merge_top_k, rerank_exact
from retrocli.storage import fetch_for_search, origin_of

POLL_SECONDS = 1.0  # how often a waiting search checks that the owners it waits on are alive

# On a worker: (DB path, content id, ef) -> the index of the shards this worker owns.
_OWNED: dict[tuple, ShardedIndex] = {}
# On a worker: (URL, cache dir, content id) -> its local copy for search, and the shards fetched into it.
_FETCHED: dict[tuple, tuple[str, set[int]]] = {}


def _local_copy(location: str | tuple, shards: tuple[int, ...]) -> tuple[str, bool]:
    """The local DB path to search at, and whether it is a partial copy. A DB on object storage arrives as
    (URL, cache dir, content id): the worker fetches the manifest, the small arrays and its own shards into
    its cache (never another shard, nor embeddings or tokens), again only when it is given new shards."""
    if isinstance(location, str):
        return location, False
    url, cache_dir, content = location
    have = _FETCHED.get((url, cache_dir, content))
    if have is None or not set(shards) <= have[1]:
        wanted = set(shards) | (have[1] if have else set())
        _FETCHED.clear()
        _FETCHED[(url, cache_dir, content)] = (str(fetch_for_search(url, cache_dir, wanted)), wanted)
    return _FETCHED[(url, cache_dir, content)][0], True


def _owned_index(db_path: str, width: SearchWidth, partial: bool = False) -> tuple[tuple, ShardedIndex | None]:
    db = open_db(db_path, check_files=not partial)  # a partial copy lacks the arrays search never reads
    key = (db_path, db.content_id, width)  # the content: after a remove, never the old index
    if key not in _OWNED:
        _OWNED.clear()  # one DB's shards at a time: a long-lived worker never piles up old indexes
        _OWNED[key] = ShardedIndex(db, **asdict(width), shards=())
    return key, _OWNED[key]


def search_owned(location: str | tuple, width: SearchWidth, shards: tuple[int, ...], vectors: np.ndarray, k: int):
    """On the owner: the per-shard top-k of `shards` (loaded on first use and kept). `location`: the DB's
    path, or (URL, cache dir, content id) for a DB on object storage."""
    db_path, partial = _local_copy(location, shards)
    _, index = _owned_index(db_path, width, partial)
    index.load(shards)
    wanted = set(shards)
    return [result for result in index.search_shards(vectors, k) if result[0] in wanted]


def loaded_shards() -> dict[str, list[int]]:
    """On a worker: the shard numbers it holds in memory, per DB path (what the tests check)."""
    return {key[0]: sorted(index.loaded) for key, index in _OWNED.items()}


class OwnedShards:
    """The DB's index as its owners on the cluster hold it; `search` has ShardedIndex's interface."""

    def __init__(self, client: Any, db: RetroDB, width: SearchWidth, replicas: int = 1):
        if replicas < 1:
            raise RetroError(f"--replicas: must be at least 1, got {replicas}")
        if db.stage("index") != "complete":
            raise RetroError(f"{db.path}: index stage is not complete; run `retro index {db.path}`")
        self.client, self.width = client, width
        self.db = db
        meta = db.manifest["index"]
        # a quantised kind: the owners return their top `rerank` candidates, re-ranked here once merged
        self.rerank = width.settings(db).get("rerank", 0)
        self.space = meta["space"]
        self._rows = None
        origin = origin_of(db.path)  # a DB on object storage: each owner fetches its shards itself
        self.location = str(db.path) if origin is None else (*origin, db.content_id)
        self.size = db.num_chunks
        self.distributed = import_distributed()
        self.shards = [int(s["shard"]) for s in db.manifest["index"]["shards"]]
        workers = self._live_workers()
        if not workers:
            raise RetroError("--dask: the cluster has no workers")
        self.replicas = min(replicas, len(workers))
        # shard -> its owners, round-robin over the workers in address order (a stable placement)
        self.owners = {s: [workers[(i + j) % len(workers)] for j in range(self.replicas)]
                       for i, s in enumerate(self.shards)}
        self.lock = threading.Lock()
        self.turn = 0  # rotates which replica serves a request, spreading the load

    def _live_workers(self) -> list[str]:
        return sorted(self.client.scheduler_info(n_workers=-1)["workers"])

    def placement(self) -> dict[str, list[int]]:
        """worker -> the shards placed on it."""
        with self.lock:
            placed: dict[str, list[int]] = {}
            for shard, owners in self.owners.items():
                for worker in owners:
                    placed.setdefault(worker, []).append(shard)
            return {w: sorted(s) for w, s in sorted(placed.items())}

    def _replace_lost(self) -> None:
        """Give the shards of workers that left to the live workers owning the fewest shards."""
        live = self._live_workers()
        if not live:
            raise RetroError("--dask: every worker has left the cluster; rerun the same command to resume")
        with self.lock:
            load = {w: 0 for w in live}
            for owners in self.owners.values():
                for w in owners:
                    if w in load:
                        load[w] += 1
            for shard in self.shards:
                kept = [w for w in self.owners[shard] if w in load]
                while len(kept) < min(self.replicas, len(live)):
                    new = min((w for w in live if w not in kept), key=lambda w: (load[w], w))
                    kept.append(new)
                    load[new] += 1
                self.owners[shard] = kept

    def _plan(self, shards: list[int]) -> dict[str, list[int]]:
        """worker -> the shards it searches for one request: one owner per shard."""
        with self.lock:
            self.turn += 1
            plan: dict[str, list[int]] = {}
            for shard in shards:
                owners = self.owners[shard]
                plan.setdefault(owners[(self.turn + shard) % len(owners)], []).append(shard)
            return plan

    def search(self, vectors: np.ndarray, k: int, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over every shard, each searched by one of its live owners (re-ranked here with the
        stored embeddings on a quantised kind)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        results: list = []
        todo = list(self.shards)
        while todo:
            sent = {}  # future -> (the worker it must run on, its shards)
            for worker, shards in self._plan(todo).items():
                future = self.client.submit(search_owned, self.location, self.width, tuple(shards), vectors, k,
                                            workers=[worker], allow_other_workers=False, pure=False)
                sent[future] = (worker, shards)
            todo = []
            while sent:
                try:
                    done = self.distributed.wait(list(sent), timeout=POLL_SECONDS, return_when="FIRST_COMPLETED").done
                except TimeoutError:
                    done = set()
                for future in done:
                    try:  # bounded: a finished result held by a worker that dies since is lost again
                        results.extend(future.result(timeout=POLL_SECONDS))
                    except RetroError:
                        raise
                    except TimeoutError:
                        continue  # still in `sent`: checked below like any request not back yet
                    except Exception:  # its owner died while running it: ask the shards' new owners
                        todo.extend(sent[future][1])
                    del sent[future]
                live = set(self._live_workers()) if sent else set()
                for future in [f for f, (worker, _) in sent.items() if worker not in live]:
                    future.cancel()  # pinned to a worker that left, it would never run: send it elsewhere
                    todo.extend(sent.pop(future)[1])
            if todo:
                self._replace_lost()
        if not self.rerank:
            return merge_top_k(results, len(vectors), k)
        ids, _ = merge_top_k(results, len(vectors), max(k, self.rerank))
        if self._rows is None:
            self._rows = VectorRows(self.db)
        return rerank_exact(self._rows, self.space, vectors, ids, k)

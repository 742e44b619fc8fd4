"""Workers own shards: `neighbors --dask` loads each shard only on the workers it is placed on, merges the
per-shard top-k exactly, and survives a worker killed mid-run with the same result."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from retrocli.batch_neighbors import batch_neighbors
from retrocli.build_db import build_db
from retrocli.db import open_db
from retrocli.index import SearchWidth
from retrocli.neighbor_arrays import open_neighbors
from retrocli.options import EmbedOptions, IndexOptions, NeighborOptions

distributed = pytest.importorskip("distributed")

from retrocli.shard_owners import OwnedShards, loaded_shards  # noqa: E402

BLOCK = 16
SHARDS = 4


@pytest.fixture(scope="module")
def db4(tmp_path_factory, tiny_bert, small_jsonl):
    """A DB of exactly four shards."""
    probe = build_db(
        [small_jsonl], tmp_path_factory.mktemp("probe") / "db", index_options=IndexOptions(threads=1),
        embed_options=EmbedOptions(embedder=tiny_bert, precision="fp32", threads=1, block_size=BLOCK),
    )
    path = tmp_path_factory.mktemp("four") / "db"
    build_db(
        [small_jsonl], path, index_options=IndexOptions(shard_size=-(-probe.num_chunks // SHARDS), threads=1),
        embed_options=EmbedOptions(embedder=tiny_bert, precision="fp32", threads=1, block_size=BLOCK),
    )
    assert len(open_db(path).manifest["index"]["shards"]) == SHARDS
    return path


@pytest.fixture
def cluster():
    """A fresh cluster per test: what each worker has loaded is part of what the tests check."""
    local = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with distributed.Client(local) as client:
        yield client
    local.close()


@pytest.fixture(scope="module")
def expected(db4, tmp_path_factory):
    return open_neighbors(batch_neighbors(
        db4, [db4], tmp_path_factory.mktemp("nb") / "local",
        options=NeighborOptions(k=3, exclude_same_doc=True, block_size=BLOCK),
    ))


def _loaded(client, db_path) -> dict[str, list[int]]:
    return {worker: held.get(str(db_path), []) for worker, held in client.run(loaded_shards).items()}


def test_each_worker_loads_only_its_own_shards_and_the_result_is_exact(db4, expected, cluster, tmp_path):
    got = open_neighbors(batch_neighbors(
        db4, [db4], tmp_path / "nb", dask=cluster,
        options=NeighborOptions(k=3, exclude_same_doc=True, block_size=BLOCK),
    ))
    np.testing.assert_array_equal(got.ids, expected.ids)
    np.testing.assert_array_equal(got.distances, expected.distances)
    loaded = _loaded(cluster, db4)
    assert sorted(loaded.values()) == [[0, 2], [1, 3]]  # round-robin, disjoint, together all four
    assert OwnedShards(cluster, open_db(db4), SearchWidth(64)).placement() == loaded


def test_replicas_place_every_shard_twice_with_the_same_result(db4, expected, cluster, tmp_path):
    got = open_neighbors(batch_neighbors(
        db4, [db4], tmp_path / "nb", dask=cluster, replicas=2,
        options=NeighborOptions(k=3, exclude_same_doc=True, block_size=BLOCK),
    ))
    np.testing.assert_array_equal(got.ids, expected.ids)
    assert all(held == list(range(SHARDS)) for held in _loaded(cluster, db4).values())


class _KillOnFirstBlock:
    """A progress sink that kills one worker (SIGKILL) when the first block lands: the run is mid-way."""

    def __init__(self, client):
        self.client, self.killed = client, None

    def start(self, name, total, unit, completed=0):
        return self

    def advance(self, n=1):
        if self.killed is None:
            pids = self.client.run(os.getpid)
            self.killed = sorted(pids)[0]
            os.kill(pids[self.killed], signal.SIGKILL)

    def finish(self):
        pass


def test_a_worker_killed_mid_run_has_its_shards_replaced_and_the_result_is_unchanged(db4, expected, cluster,
                                                                                     tmp_path):
    progress = _KillOnFirstBlock(cluster)
    got = open_neighbors(batch_neighbors(
        db4, [db4], tmp_path / "nb", dask=cluster, progress=progress,
        options=NeighborOptions(k=3, exclude_same_doc=True, block_size=BLOCK),
    ))
    assert progress.killed is not None
    assert got.manifest["status"] == "complete"
    np.testing.assert_array_equal(got.ids, expected.ids)
    np.testing.assert_array_equal(got.distances, expected.distances)
    assert progress.killed not in cluster.scheduler_info(n_workers=-1)["workers"]
    # the survivor (and the nanny's replacement) picked up the dead worker's shards: all four are held
    held = _loaded(cluster, db4)
    assert sorted({s for shards in held.values() for s in shards}) == list(range(SHARDS))


def test_replicas_below_one_is_one_line(db4, cluster):
    from retrocli.errors import RetroError

    with pytest.raises(RetroError, match="--replicas"):
        OwnedShards(cluster, open_db(db4), SearchWidth(64), replicas=0)


def test_an_ivfpq_index_built_and_searched_on_dask_equals_the_local_one(db4, cluster, tmp_path):
    """One task per shard adds to the one trained quantiser; owners return their candidates, which this
    process merges and re-ranks: the same files and neighbours as a build and search in one process."""
    import shutil

    from retrocli.index import index_db, remove_index

    options = IndexOptions(kind="ivfpq", nlist=4, pq_bytes=16, rerank=20, shard_size=-(-open_db(db4).num_chunks // 4))
    local, remote = tmp_path / "local", tmp_path / "remote"
    for path in (local, remote):
        shutil.copytree(db4, path)
        remove_index(path)
    index_db(local, options)
    index_db(remote, options, dask=cluster)
    shards = lambda path: [s["sha256"] for s in open_db(path).manifest["index"]["shards"]]  # noqa: E731
    assert shards(local) == shards(remote) and len(shards(local)) == SHARDS
    settings = NeighborOptions(k=3, exclude_same_doc=True, block_size=BLOCK)
    here = open_neighbors(batch_neighbors(local, [local], tmp_path / "nb-local", options=settings))
    there = open_neighbors(batch_neighbors(remote, [remote], tmp_path / "nb-dask", dask=cluster, options=settings))
    np.testing.assert_array_equal(here.ids, there.ids)
    np.testing.assert_allclose(here.distances, there.distances, rtol=1e-5)
    assert sorted(_loaded(cluster, remote).values()) == [[0, 2], [1, 3]]

"""The kinds of index a DB (or a kNN-LM datastore) can be searched with: one shard file format each.

    hnsw    hnswlib HNSW over fp32 vectors. Distances are exact; ≈ 1.9 KB a 384-d vector in RAM.
    ivfpq   faiss IVF + PQ: a coarse quantiser of `nlist` lists and a `pq_bytes`-byte code a vector
            (+ its 8-byte id) in RAM. Distances are approximate, so the search asks for the top `rerank`
            candidates and re-ranks them with the exact vectors (retrocli.index.rerank_exact). A DB's
            codes are 4-bit (2·pq_bytes sub-spaces) in faiss's fast-scan layout, which scans a list with
            SIMD table look-ups; a kNN-LM datastore, searched by its codes alone, keeps 8-bit codes.

An ivfpq index is trained once, on a seeded sample of the vectors, and kept as an empty trained index
(`index/trained.faiss`). Every shard is a copy of it with its vectors added, including the shards `retro
add` writes later: the shards share one set of codebooks, so their approximate distances compare.
faiss files are its own binary format (no pickle); like hnswlib, faiss trusts them, so every file is
checked against its recorded sha256 before it is read.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrocli.checksums import file_sha256
from retrocli.errors import RetroError

KINDS = ("hnsw", "ivfpq")
SUFFIX = {"hnsw": ".hnsw", "ivfpq": ".faiss"}
TRAINED_FILE = "trained.faiss"
ADD_BLOCK = 16384
# faiss's k-means wants ≥ 39 points a centroid; more adds training time and little accuracy
TRAIN_POINTS_PER_LIST = 64
MAX_TRAIN_SAMPLE = 262_144


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise RetroError(f"--kind: must be one of {', '.join(KINDS)}, got '{kind}'")
    return kind


def shard_suffix(kind: str) -> str:
    return SUFFIX[kind]


def _faiss():
    import faiss

    return faiss


def _metric(space: str):
    faiss = _faiss()
    return faiss.METRIC_L2 if space == "l2" else faiss.METRIC_INNER_PRODUCT


def _prepared(vectors: np.ndarray, space: str) -> np.ndarray:
    """Vectors as faiss takes them: float32, contiguous, unit length for cosine (so inner product = cos)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if space == "cosine":
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.where(norms > 0, norms, 1)
    return vectors


def to_space_distance(similarity_or_l2: np.ndarray, space: str) -> np.ndarray:
    """faiss gives squared L2, or an inner product to maximise; hnswlib's convention is a distance to
    minimise: 1 − ip for ip and cosine. Everything retrocli returns follows hnswlib's."""
    return similarity_or_l2 if space == "l2" else (1.0 - similarity_or_l2)


def exact_distances(queries: np.ndarray, vectors: np.ndarray, space: str) -> np.ndarray:
    """[q, c] distances of each query to its c candidate vectors ([q, c, d]) in the index's space, as
    hnswlib defines them: squared L2, 1 − ip, or 1 − cos."""
    queries = queries.astype(np.float32, copy=False)
    vectors = vectors.astype(np.float32, copy=False)
    if space == "cosine":
        queries = _prepared(queries, "cosine")
        norms = np.linalg.norm(vectors, axis=2, keepdims=True)
        vectors = vectors / np.where(norms > 0, norms, 1)
    dots = np.matmul(vectors, queries[:, :, None])[:, :, 0]
    if space != "l2":
        return 1.0 - dots
    # ‖x − q‖² = ‖x‖² − 2 x·q + ‖q‖²: no [q, c, d] difference array
    squared = np.einsum("qcd,qcd->qc", vectors, vectors) - 2 * dots + np.einsum("qd,qd->q", queries, queries)[:, None]
    return np.maximum(squared, 0)


# -- ivfpq: training -------------------------------------------------------------------------------

@dataclass
class IvfPqParams:
    """What an ivfpq index is built with; 0 means: chosen from the number of vectors (auto_nlist)."""

    nlist: int = 0
    pq_bytes: int = 48
    opq: bool = True
    # 4-bit codes in the fast-scan layout: the same bytes, scanned ≈ 4× faster (benchmarks.md, "Index kinds")
    fast_scan: bool = False


def auto_nlist(n: int) -> int:
    """≈ 4·√n lists (a power of two), as faiss's guidelines advise, and few enough that every list gets
    TRAIN_POINTS_PER_LIST training points."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 2 ** max(0, round(math.log2(target)))
    return max(1, min(nlist, 65536, n // TRAIN_POINTS_PER_LIST or 1))


def pq_bits(sample: int) -> int:
    """8-bit codes (256 centroids a sub-space) where there are ≥ 256·4 training points; fewer bits on a
    tiny DB, since faiss cannot train more centroids than points."""
    return max(1, min(8, int(math.log2(max(sample // 4, 2)))))


def check_pq_bytes(dim: int, pq_bytes: int) -> None:
    if pq_bytes < 1 or dim % pq_bytes:
        divisors = [m for m in (8, 12, 16, 24, 32, 48, 64, 96) if dim % m == 0]
        raise RetroError(f"--pq-bytes: must divide the vectors' dimension {dim} (e.g. "
                         f"{', '.join(map(str, divisors))}), got {pq_bytes}")


KNN_PQ_BYTES = (96, 64, 48, 32, 16, 8)


def auto_knn_pq_bytes(dim: int) -> int:
    """A kNN-LM datastore's code size when none is given: searched by its codes alone, it needs more bytes
    than a DB's re-ranked index (96 kept every kNN-LM bpb within 0.5 % of the exact store's at d 576; 64
    cost up to 0.6 %): the first of KNN_PQ_BYTES that divides the model width."""
    return next((m for m in KNN_PQ_BYTES if dim % m == 0), 1)


def train_sample_rows(n: int, nlist: int, seed: int) -> np.ndarray:
    """The sorted row numbers the quantisers are trained on: a seeded uniform sample."""
    size = min(n, max(TRAIN_POINTS_PER_LIST * nlist, 16384), MAX_TRAIN_SAMPLE)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def read_rows(read_vectors: Callable[[int, int], np.ndarray], rows: np.ndarray, n: int,
              block: int = ADD_BLOCK) -> np.ndarray:
    """The given sorted rows, reading only the blocks of `block` rows that hold some."""
    parts = []
    for first in np.unique(rows // block) * block:
        wanted = rows[(rows >= first) & (rows < first + block)]
        parts.append(read_vectors(int(first), int(min(n, first + block)))[wanted - first])
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def train_ivfpq(sample: np.ndarray, space: str, params: IvfPqParams, nlist: int, seed: int, threads: int,
                final: Path) -> dict:
    """Train the quantisers on `sample` and write the empty trained index to `final` (via a temp name);
    returns what the manifest records about it. Seeded: the same sample and seed give the same bytes."""
    faiss = _faiss()
    dim = sample.shape[1]
    check_pq_bytes(dim, params.pq_bytes)
    sample_bits = pq_bits(len(sample))
    # fast scan needs 4-bit codes (16 centroids a sub-space, so ≥ 64 training points) and an even split
    fast = params.fast_scan and sample_bits >= 4 and dim % (2 * params.pq_bytes) == 0
    bits, subspaces, suffix = (4, 2 * params.pq_bytes, "fs") if fast else (sample_bits, params.pq_bytes, "")
    opq = params.opq and sample_bits == 8  # OPQ trains an 8-bit PQ of its own (with faiss's fixed seeds)
    factory = (f"OPQ{subspaces}," if opq else "") + f"IVF{nlist},PQ{subspaces}x{bits}{suffix}"
    faiss.omp_set_num_threads(threads)
    index = faiss.index_factory(dim, factory, _metric(space))
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.seed = seed
    ivf.pq.cp.seed = seed + 1
    # a small DB trains on fewer points than faiss advises: that is expected, not worth a warning each time
    ivf.cp.min_points_per_centroid = ivf.pq.cp.min_points_per_centroid = 1
    if not fast:  # Hamming-ordered codes: minutes of training, for a filter we do not use
        ivf.do_polysemous_training = False
    # codes of the vectors, not of their residuals from the list centroid: one distance table a query
    # instead of one a probed list (≈ 3× the queries/s), no precomputed table in RAM (50 MB at 1,024
    # lists), and after re-ranking, recall as good or better (benchmarks.md, "Index kinds")
    ivf.by_residual = False
    index.train(_prepared(sample, space))
    _write_checked(index, final, 0)
    return {"factory": factory, "nlist": nlist, "pq_bytes": params.pq_bytes, "pq_bits": bits,
            "fast_scan": fast, "opq": opq, "by_residual": False, "train_sample": len(sample)}


def train_recorded(read_vectors: Callable[[int, int], np.ndarray], n: int, space: str, params: IvfPqParams,
                   nlist: int, seed: int, threads: int, index_dir: Path, progress, what: str) -> dict:
    """Train the quantisers on a seeded sample of n vectors (read_vectors(a, b) reads rows a to b) into
    index_dir/trained.faiss; returns its manifest record (the file relative to index_dir's parent, its
    bytes and sha256). A DB's index and a kNN-LM datastore's both come from here."""
    rows = train_sample_rows(n, nlist, seed)
    task = progress.start(what, total=len(rows), unit="vectors")
    sample = read_rows(read_vectors, rows, n)
    final = index_dir / TRAINED_FILE
    info = train_ivfpq(sample, space, params, nlist, seed, threads, final)
    task.advance(len(rows))
    task.finish()
    return {**info, "file": f"{index_dir.name}/{TRAINED_FILE}", "bytes": final.stat().st_size,
            "sha256": file_sha256(final)}


def _write_checked(index, final: Path, count: int) -> None:
    """faiss.write_index to a temp name, read back whole, then renamed: a cut file (full disk) never
    takes the final name."""
    faiss = _faiss()
    tmp = final.with_suffix(f".{os.getpid()}.partial")  # two workers retrying one shard never share a file
    try:
        faiss.write_index(index, str(tmp))
    except RuntimeError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(errno.ENOSPC, f"the index file could not be written ({err})", str(final)) from None
    check_saved(tmp, "ivfpq", count)
    os.replace(tmp, final)


# -- shards ----------------------------------------------------------------------------------------

def write_shard(
    kind: str, read_vectors: Callable[[int, int], np.ndarray], start: int, stop: int, first_label: int,
    final: Path, space: str, dim: int, params: dict, threads: int, task=None, trained: Path | None = None,
) -> None:
    """A shard of vectors [start, stop) (read_vectors(a, b) gives rows [a, b) as float32), labelled
    first_label + row, written to `final` via a temp name and checked whole before the rename. `params`:
    the index record (M, ef_construction, seed for hnsw); `trained`: the trained index file (ivfpq)."""
    if kind == "hnsw":
        import hnswlib

        index = hnswlib.Index(space=space, dim=dim)
        index.init_index(max_elements=max(stop - start, 1), M=params["M"],
                         ef_construction=params["ef_construction"], random_seed=params.get("seed", 100))
        add = lambda vectors, labels: index.add_items(vectors, labels, num_threads=threads)  # noqa: E731
    else:
        faiss = _faiss()
        faiss.omp_set_num_threads(threads)
        index = faiss.read_index(str(trained))
        add = lambda vectors, labels: index.add_with_ids(_prepared(vectors, space), labels)  # noqa: E731
    for block in range(start, stop, ADD_BLOCK):
        block_stop = min(stop, block + ADD_BLOCK)
        add(read_vectors(block, block_stop), np.arange(block, block_stop, dtype=np.int64) + first_label)
        if task is not None:
            task.advance(block_stop - block)
    if kind == "hnsw":
        tmp = final.with_suffix(f".{os.getpid()}.partial")
        index.save_index(str(tmp))  # hnswlib writes without checking for errors: check_saved reads it back
        check_saved(tmp, kind, stop - start, space, dim)
        os.replace(tmp, final)
    else:
        _write_checked(index, final, stop - start)


def check_saved(file: Path, kind: str, count: int, space: str = "l2", dim: int = 0) -> None:
    """Loading a written file back (which checks its length) is what tells a whole file from one cut
    short by a full disk; a cut file is removed."""
    try:
        whole = load_shard(file, kind, space, dim, count).count == count
    except (RuntimeError, ValueError, MemoryError, RetroError):
        whole = False
    if not whole:
        file.unlink(missing_ok=True)
        raise OSError(errno.ENOSPC, "the index file was cut short while writing (is the disk full?)", str(file))


class Shard:
    """One loaded shard: `search` returns (labels int64, distances float32) with −1 / inf where it has
    fewer than k; `exact` says whether those distances are the true ones."""

    exact = True
    count = 0

    def search(self, vectors: np.ndarray, k: int, width: int, threads: int,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class HnswShard(Shard):
    def __init__(self, index):
        self.index = index
        self.count = index.get_current_count()

    def search(self, vectors, k, width, threads, allowed=None):
        """`allowed`: bool over the labels; hnswlib's filtered walk skips the others (it raises RuntimeError
        when it finds fewer than k: the caller then over-fetches)."""
        self.index.set_ef(max(width, k))
        if allowed is None:
            labels, distances = self.index.knn_query(vectors, k=k, num_threads=threads)
        else:
            labels, distances = self.index.knn_query(vectors, k=k, num_threads=1, filter=lambda label: allowed[label])
        return labels.astype(np.int64), distances.astype(np.float32)


class IvfPqShard(Shard):
    exact = False

    def __init__(self, index, space: str):
        self.index, self.space = index, space
        self.count = int(index.ntotal)
        self.ivf = _faiss().extract_index_ivf(index)
        self._filter: tuple[np.ndarray, np.ndarray, object] | None = None  # (allowed, its bitmap, the selector)

    def _selector(self, allowed: np.ndarray):
        """faiss's bitmap selector for `allowed`, packed once per array (a DB version's live chunks) rather
        than once per search: packing N bits costs more than a small batch's scan."""
        if self._filter is None or self._filter[0] is not allowed:
            bitmap = np.packbits(allowed.astype(bool), bitorder="little")
            self._filter = (allowed, bitmap, _faiss().IDSelectorBitmap(len(allowed), _faiss().swig_ptr(bitmap)))
        return self._filter[2]  # the tuple keeps the bitmap alive as long as faiss may read it

    def search(self, vectors, k, width, threads, allowed=None):
        """`width`: lists probed. `allowed`: bool over the labels; faiss tests each listed id against the
        bitmap while it scans, so a filter costs no recall however much it excludes."""
        faiss = _faiss()
        faiss.omp_set_num_threads(threads)
        params = faiss.SearchParametersIVF()
        params.nprobe = max(1, min(width, self.ivf.nlist))
        if allowed is not None:
            params.sel = self._selector(allowed)
        distances, labels = self.index.search(_prepared(vectors, self.space), k, params=params)
        labels = labels.astype(np.int64)
        distances = to_space_distance(distances.astype(np.float32), self.space)
        distances[labels < 0] = np.inf
        return labels, distances


def load_shard(file: Path, kind: str, space: str, dim: int, count: int) -> Shard:
    """A checked shard file, loaded; RuntimeError/ValueError when the library cannot read it."""
    if kind == "hnsw":
        import hnswlib

        index = hnswlib.Index(space=space, dim=dim)
        index.load_index(str(file), max_elements=max(count, 1))
        return HnswShard(index)
    faiss = _faiss()
    index = faiss.read_index(str(file))
    if dim and index.d != dim:
        raise ValueError(f"holds {index.d}-d vectors, expected {dim}-d")
    return IvfPqShard(index, space)


def load_trained(file: Path):
    """The trained empty ivfpq index (to add vectors to)."""
    return _faiss().read_index(str(file))

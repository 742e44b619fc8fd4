import numpy as np
import pytest

from retrocli.overlap import longest_runs, longest_shared_run, overlap_ratio


def longest_shared_run_of(a, b) -> int:
    return longest_shared_run(np.asarray(a), [np.asarray(b)])


def brute_longest_run(a, b) -> int:
    best = 0
    for i in range(len(a)):
        for j in range(len(b)):
            n = 0
            while i + n < len(a) and j + n < len(b) and a[i + n] == b[j + n]:
                n += 1
            best = max(best, n)
    return best


def test_overlap_ratio_matches_brute_force_on_random_tokens():
    rng = np.random.default_rng(7)
    for _ in range(300):
        m = int(rng.integers(0, 9))  # includes empty and length-1 chunks
        chunk = rng.integers(0, 4, m)
        neighbors = [rng.integers(0, 4, int(rng.integers(0, 17))) for _ in range(int(rng.integers(1, 4)))]
        expected = max(brute_longest_run(chunk, n) for n in neighbors) / m if m else 0.0
        assert overlap_ratio(chunk, neighbors) == pytest.approx(expected), (chunk, neighbors)


def test_longest_runs_positions_point_at_the_shared_run():
    rng = np.random.default_rng(3)
    q = rng.integers(0, 50, (4, 10))
    targets = np.full((4, 2, 20), -2)
    targets[:, 1, 5:12] = q[:, 2:9]  # plant a 7-token run
    s, which, qs, ts = longest_runs(q, np.full(4, 10), targets)
    assert (s >= 7).all() and (which == 1).all()
    for b in range(4):
        assert (q[b, qs[b]: qs[b] + s[b]] == targets[b, 1, ts[b]: ts[b] + s[b]]).all()


def test_longest_shared_run_against_one_target():
    assert longest_shared_run_of(np.array([1, 2, 3, 4, 5]), np.array([9, 2, 3, 4, 7, 1, 2])) == 3
    assert longest_shared_run_of(np.array([1, 2]), np.array([3, 4])) == 0
    assert longest_shared_run_of(np.array([5, 5, 5]), np.array([5, 5, 5, 5])) == 3
    rng = np.random.default_rng(0)
    for _ in range(20):  # against a plain O(n*m) reference
        a, b = rng.integers(0, 3, 12), rng.integers(0, 3, 15)
        ref = max((n for i in range(12) for j in range(15) for n in range(1, 13)
                   if i + n <= 12 and j + n <= 15 and (a[i:i + n] == b[j:j + n]).all()), default=0)
        assert longest_shared_run_of(a, b) == ref


def test_compute_overlap_of_a_db_against_itself(tiny_db):
    from retrocli.db import open_db
    from retrocli.overlap import compute_overlap

    db = open_db(tiny_db)
    own = np.arange(db.num_chunks)[:, None]
    ov = compute_overlap(db, db, np.hstack([np.full_like(own, -1), own]), block=16)
    real = db.chunk_length > 0
    assert (ov.r[real] == 1.0).all() and (ov.neighbor[real] == own[real, 0]).all()
    assert (ov.shared == db.chunk_length).all()
    none = compute_overlap(db, db, np.full((db.num_chunks, 2), -1), block=16)
    assert (none.r == 0).all() and (none.neighbor == -1).all()

"""One runner for every resumable stage cut into numbered blocks: embed, index, batch neighbours and the
kNN-LM datastore's keys and shards. It owns what is done and what is left, the progress bar, the commit
of each finished block, and where the blocks run (here, on Dask, or on --devices worker processes); a
stage is a function of one block.

A stage's manifest record says which blocks are finished: their numbers in `done_blocks` while it runs,
or, for a stage whose blocks are index shards, the shards' own records (which outlive the run). A block's
output depends only on its inputs and is written whole, so a block that was running when the process
died is simply run again, and a rerun resumes at the first block not recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from retrocli.cluster import run_blocks
from retrocli.progress import Progress


@dataclass
class BlockStage:
    """A stage of `total` items (chunks, vectors, keys) in blocks of `block_size`, recorded in `record`
    (a dict inside a manifest that `commit` writes atomically)."""

    name: str  # the progress bar's label; Dask task keys and error messages use it too
    record: dict  # status, seconds and (while running) done_blocks
    commit: Callable[[], None]
    total: int
    block_size: int
    unit: str
    shard_records: list | None = None  # blocks are shards, finished ones recorded here instead of done_blocks
    min_blocks: int = 0  # an index of an empty DB still has its one (empty) shard

    @property
    def num_blocks(self) -> int:
        return max(self.min_blocks, -(-self.total // self.block_size))

    def block_items(self, block: int) -> int:
        return max(0, min(self.block_size, self.total - block * self.block_size))

    def done(self) -> set[int]:
        if self.shard_records is not None:
            return {int(shard["shard"]) for shard in self.shard_records}
        return set(self.record.setdefault("done_blocks", []))

    def todo(self) -> list[int]:
        done = self.done()
        return [block for block in range(self.num_blocks) if block not in done]

    def run(
        self, function: Callable, args: tuple, progress: Progress, client: Any = None,
        max_blocks: int | None = None, reports_progress: bool = False,
        execute: Callable[[list[int], tuple], Iterator[Any]] | None = None,
        on_result: Callable[[Any], None] | None = None, finish: Callable[[dict], None] | None = None,
    ) -> bool:
        """Run function(*args, block) for every block not yet recorded and record each as it finishes;
        True when the stage is complete (then `finish` adds what the complete record holds, and it is
        committed), False when max_blocks stopped it first.

        function returns (block, items, ...) or, for shards, the shard's record ({"shard", "count", ...}).
        reports_progress: function takes a progress task before the block and advances it itself (in this
        process; elsewhere it gets None and the bar advances per block). execute(blocks, args) replaces
        the default placement (in order here, or as Dask tasks on `client`). on_result(result) runs before
        the block is committed (e.g. to adopt files a worker uploaded)."""
        todo = self.todo()
        task = progress.start(self.name, total=self.total, unit=self.unit,
                              completed=self.total - sum(self.block_items(b) for b in todo))
        if max_blocks is not None:
            todo = todo[:max_blocks]
        in_process = client is None and execute is None
        if reports_progress:
            args = (*args, task if in_process else None)
        started = time.time()
        results = execute(todo, args) if execute else run_blocks(client, self.name.replace(" ", "-"), function,
                                                                 args, todo)
        for result in results:
            if on_result is not None:
                on_result(result)
            if self.shard_records is not None:
                self.shard_records.append(result)
                self.shard_records.sort(key=lambda shard: shard["shard"])
                items = int(result["count"])
            else:
                self.record["done_blocks"] = sorted({*self.record.get("done_blocks", []), int(result[0])})
                items = int(result[1])
            self.commit()
            if not (reports_progress and in_process):
                task.advance(items)
        if self.todo():  # stopped early by max_blocks
            return False
        self.record["status"] = "complete"
        self.record["seconds"] = round(self.record.get("seconds", 0) + time.time() - started, 3)
        self.record.pop("done_blocks", None)
        if finish is not None:
            finish(self.record)
        self.commit()
        task.finish()
        return True

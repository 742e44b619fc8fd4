"""Progress reporting that stage functions can drive without knowing who is watching.

The API default is silent; the CLI passes a rich display (one bar per stage, rate and ETA), so
`build-db` shows chunk, embed and index in one display.
"""

from __future__ import annotations

from typing import Protocol


class Task(Protocol):
    def advance(self, n: int = 1) -> None: ...
    def finish(self) -> None: ...


class Progress(Protocol):
    def start(self, name: str, total: int | None, unit: str, completed: int = 0) -> Task: ...


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass

    def finish(self) -> None:
        pass


class NullProgress:
    def start(self, name: str, total: int | None, unit: str, completed: int = 0) -> Task:
        return _NullTask()


class RichProgress:
    """A rich Progress display; use as a context manager around the stages."""

    def __init__(self, console=None, enabled: bool = True):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import (
            Progress as RichBar,
        )

        self.bar = RichBar(
            TextColumn("[bold]{task.description:<10}"),
            BarColumn(),
            TaskProgressColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TextColumn("[cyan]{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )

    def __enter__(self):
        # the display starts with the first bar: started empty, it ends with a blank line, which would
        # come before an error found before any work (`\nerror: …`)
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.bar.live.is_started:
            return None
        if exc_type is not None:  # on an error, clear the bars so the one error line stands alone
            self.bar.live.transient = True
            self.bar.live.stop()  # not the bar's own stop, which ends a non-terminal's output with a blank line
            return None
        return self.bar.__exit__(exc_type, exc, tb)

    def start(self, name: str, total: int | None, unit: str, completed: int = 0) -> Task:
        if not self.bar.live.is_started:
            self.bar.start()
        task_id = self.bar.add_task(name, total=total, completed=completed, unit=unit, rate="")
        return _RateTask(self.bar, task_id)


class _RateTask:
    """Shows items/s as rich measures it over a recent window, so resumed work does not inflate it."""

    def __init__(self, bar, task_id):
        self.bar, self.task_id = bar, task_id
        self.noted = False

    def advance(self, n: int = 1) -> None:
        self.bar.advance(self.task_id, n)
        task = next(t for t in self.bar.tasks if t.id == self.task_id)
        speed = task.speed
        if speed and not self.noted:
            self.bar.update(self.task_id, rate=f"{speed:,.0f}/s")

    def note(self, text: str) -> None:
        """Replace the rate column with a stage's own figures (e.g. training loss and tokens/s)."""
        self.noted = True
        self.bar.update(self.task_id, rate=text)

    def finish(self) -> None:
        task = next(t for t in self.bar.tasks if t.id == self.task_id)
        self.bar.update(self.task_id, total=task.completed)

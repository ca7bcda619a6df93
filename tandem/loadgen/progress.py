"""A rich progress bar on stderr for a load run: finished of total, ok, failed, in flight.

Stdout stays clean for the table and the JSON line. On a non-terminal stderr (a log file, CI)
rich draws no live bar, only the final state when the run ends.
"""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from tandem.loadgen.backend import RequestResult
from tandem.loadgen.workload import Request


class RichProgress:
    """A `ProgressHook` that draws a bar; use it as a context manager around `run_load`."""

    def __init__(self, total: int, *, description: str = "bench",
                 console: Console | None = None) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("ok {task.fields[ok]}  failed {task.fields[failed]}  "
                       "in flight {task.fields[in_flight]}"),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
        )
        self._total = total
        self._description = description
        self._task: TaskID | None = None
        self.ok = self.failed = self.in_flight = 0

    def __enter__(self) -> RichProgress:
        self._progress.start()
        self._task = self._progress.add_task(self._description, total=self._total, ok=0,
                                             failed=0, in_flight=0)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()

    def request_started(self, index: int, request: Request) -> None:
        self.in_flight += 1
        self._refresh(advance=0)

    def request_finished(self, index: int, request: Request, result: RequestResult) -> None:
        self.in_flight -= 1
        if result.ok:
            self.ok += 1
        else:
            self.failed += 1
        self._refresh(advance=1)

    def _refresh(self, advance: int) -> None:
        if self._task is not None:
            self._progress.update(self._task, advance=advance, ok=self.ok, failed=self.failed,
                                  in_flight=self.in_flight)

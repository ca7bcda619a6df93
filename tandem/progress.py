"""Start-up progress of `tandem serve` on stderr: what it is doing, and how many workers have
loaded the model. Rich draws a live bar on a terminal and plain lines elsewhere (logs, CI)."""

from __future__ import annotations

import sys
import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class StartupProgress:
    def __init__(self) -> None:
        self.console = Console(stderr=True)
        self.live = self.console.is_terminal
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(),
                                  console=self.console, transient=True)
        self._task = self._progress.add_task("starting", total=None)
        self._last: tuple[str, int | None] | None = None
        self._started = time.monotonic()

    def __enter__(self) -> StartupProgress:
        if self.live:
            self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.live:
            self._progress.stop()

    def update(self, step: str, done: int | None = None, total: int | None = None) -> None:
        """`step` is what runs now; `done` of `total` counts its parts (workers loaded)."""
        if self.live:
            self._progress.update(self._task, description=step, completed=done or 0,
                                  total=total)
            return
        if self._last == (step, done):
            return
        self._last = (step, done)
        count = f" ({done}/{total})" if total is not None else ""
        print(f"[{time.monotonic() - self._started:6.1f} s] {step}{count}", file=sys.stderr,
              flush=True)

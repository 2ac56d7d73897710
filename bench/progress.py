"""Progress reporting for a grid run: a live rich table on a terminal, one line per job otherwise (CI)."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import IO, Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from bench.grid import FP_METHOD, Job
from bench.tables import signed

MAX_ROWS = 24  # rows shown by the live table; large grids show a window around the running job


def metric_text(record: dict | None, metric: str) -> str:
    """``top1=81.20 (Δ -3.10)`` for a record's primary metric (first metric if none is named)."""
    if not record or not record.get("metrics"):
        return ""
    metrics = record["metrics"]
    name = metric if metric in metrics else next(iter(metrics))
    text = f"{name}={metrics[name]:.2f}"
    delta = (record.get("delta_to_fp") or {}).get(name)
    if delta is not None and record.get("method") != FP_METHOD:
        text += f" (Δ {signed(delta)})"
    return text


class Reporter:
    """Receives job events from the runner; the base class ignores them."""

    def begin(self, jobs: Sequence[Job]) -> None:
        self.jobs = list(jobs)

    def started(self, index: int) -> None: ...

    def message(self, index: int, msg: str) -> None: ...

    def finished(
        self,
        index: int,
        status: str,
        record: dict | None,
        metric: str,
        seconds: float,
        error: str | None = None,
    ) -> None: ...

    def end(self) -> None: ...


class PlainReporter(Reporter):
    """One line per finished job, for logs that are not terminals."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def finished(
        self,
        index: int,
        status: str,
        record: dict | None,
        metric: str,
        seconds: float,
        error: str | None = None,
    ) -> None:
        n = len(self.jobs)
        detail = error if status == "failed" else metric_text(record, metric)
        timing = "" if status == "cached" else f"  {seconds:.1f}s"
        print(
            f"[{index + 1:>{len(str(n))}}/{n}] {status:<6} {self.jobs[index].job_id}  {detail}{timing}",
            file=self.stream,
            flush=True,
        )


class RichReporter(Reporter):
    """A live table of jobs: status, primary metric (Δ to FP), time."""

    _STYLE = {
        "pending": "dim",
        "running": "bold yellow",
        "done": "green",
        "cached": "cyan",
        "failed": "bold red",
    }

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()

    def begin(self, jobs: Sequence[Job]) -> None:
        super().begin(jobs)
        self.rows: list[dict[str, Any]] = [{"status": "pending", "metric": "", "seconds": None} for _ in jobs]
        self.current: int | None = None
        self.t_running = 0.0
        self.live = Live(self, console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def started(self, index: int) -> None:
        self.current, self.t_running = index, time.perf_counter()
        self.rows[index]["status"] = "running"

    def message(self, index: int, msg: str) -> None:
        self.rows[index]["metric"] = msg

    def finished(
        self,
        index: int,
        status: str,
        record: dict | None,
        metric: str,
        seconds: float,
        error: str | None = None,
    ) -> None:
        self.rows[index].update(
            status=status,
            seconds=None if status == "cached" else seconds,
            metric=error if status == "failed" else metric_text(record, metric),
        )
        self.current = None

    def end(self) -> None:
        self.live.stop()

    def _window(self) -> range:
        n = len(self.rows)
        if n <= MAX_ROWS:
            return range(n)
        focus = (
            self.current
            if self.current is not None
            else next((i for i, r in enumerate(self.rows) if r["status"] == "pending"), n - 1)
        )
        start = min(max(0, focus - MAX_ROWS // 2), n - MAX_ROWS)
        return range(start, start + MAX_ROWS)

    def __rich__(self) -> Group:
        table = Table(show_edge=False, pad_edge=False)
        for col in ("#", "job", "status", "metric", "time"):
            table.add_column(col, justify="right" if col in ("#", "time") else "left")
        for i in self._window():
            row = self.rows[i]
            seconds = row["seconds"]
            if row["status"] == "running":
                seconds = time.perf_counter() - self.t_running
            table.add_row(
                str(i + 1),
                self.jobs[i].job_id,
                Text(row["status"], style=self._STYLE[row["status"]]),
                row["metric"],
                "" if seconds is None else f"{seconds:.1f}s",
            )
        counts = {s: sum(r["status"] == s for r in self.rows) for s in self._STYLE}
        footer = Text("  ".join(f"{s}: {c}" for s, c in counts.items() if c), style="dim")
        return Group(table, footer)


def make_reporter(stream: IO[str] | None = None) -> Reporter:
    stream = stream or sys.stdout
    if stream.isatty():
        return RichReporter(Console(file=stream))
    return PlainReporter(stream)

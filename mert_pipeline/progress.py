"""How a run reports while it works: progress bars, status lines and stage summaries.

The library reports through a `Progress`; the default one is silent, so the Python API prints nothing
unless asked. `ConsoleProgress` is what the CLI uses (and what a notebook or script can pass in): one
rich live display for the whole run, a row per stage, and each stage's summary table when it ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mert_pipeline.executor import StageReport


class Bar:
    """One stage's row: its total once planned, advanced as tasks finish."""

    def plan(self, total: int) -> None:
        """The stage planned `total` units of work."""

    def advance(self, amount: int) -> None:
        """`amount` more units are done."""


class Progress:
    """The silent default: every hook does nothing. Subclass it to watch a run."""

    def stage(self, name: str, unit: str) -> Bar:
        """A new row for a stage about to plan."""
        return Bar()

    @contextlib.contextmanager
    def status(self, text: str) -> Iterator[None]:
        """A step without tasks (a k-means fit, training): shown while it runs."""
        yield

    def report(self, report: StageReport, unit: str) -> None:
        """A stage finished (its summary)."""

    def note(self, text: str, style: str = "") -> None:
        """A line for the user: a result, or a warning (style "warning")."""


class _RichBar(Bar):
    def __init__(self, progress: Any, row: Any, name: str) -> None:
        self.progress, self.row, self.name = progress, row, name

    def plan(self, total: int) -> None:
        self.progress.update(self.row, description=self.name, total=total)

    def advance(self, amount: int) -> None:
        self.progress.advance(self.row, amount)


class ConsoleProgress(Progress):
    """Progress on a terminal (stderr): one live display with a row per stage, a table per stage summary.
    Use as a context manager around the run; off a terminal the bars are off and the summaries stay."""

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self.console = console or Console(stderr=True)
        self.live = RichProgress(
            TextColumn("[bold]{task.description}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not self.console.is_terminal,
        )
        self._depth = 0

    def __enter__(self) -> ConsoleProgress:
        if self._depth == 0:
            self.live.__enter__()
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.live.__exit__(*exc)

    def stage(self, name: str, unit: str) -> Bar:
        row = self.live.add_task(f"{name}: planning", total=None, unit=unit)
        return _RichBar(self.live, row, name)

    @contextlib.contextmanager
    def status(self, text: str) -> Iterator[None]:
        row = self.live.add_task(text, total=None, unit="")
        with self:
            yield
        self.live.update(row, total=1, completed=1)

    def report(self, report: StageReport, unit: str) -> None:
        self.console.print(summary_table(report, unit))

    def note(self, text: str, style: str = "") -> None:
        if style == "warning":
            self.console.print(f"[bold yellow]WARNING:[/] {text}", highlight=False, soft_wrap=True)
        else:
            self.console.print(text, highlight=False, soft_wrap=True)


def summary_table(report: StageReport, unit: str) -> Any:
    """A stage's summary: tasks, counts, hours of audio, size, wall time and throughput."""
    from rich.table import Table

    counts = report.summary.get("counts", {})
    table = Table(title=f"{report.stage} summary", show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row(
        "tasks",
        f"{report.tasks} ({report.done} run, {report.skipped} already done, {len(report.failed)} failed)",
    )
    first = ["files_seen", "accepted", "rejected"]
    for key in first + sorted(k for k in counts if k not in first):
        if key not in counts:
            continue
        value = counts[key]
        if key == "audio_seconds":
            table.add_row("audio hours", f"{value / 3600:.3f}")
        elif key == "bytes":
            table.add_row("size", f"{value / 1e6:.1f} MB")
        else:
            table.add_row(key, f"{value:g}" if isinstance(value, float) else str(value))
    seconds = max(report.seconds, 1e-9)
    seen = counts.get("files_seen", report.stats.get("files_seen", 0))
    table.add_row("wall time", f"{report.seconds:.2f} s")
    table.add_row(
        "throughput",
        f"{seen / seconds:.1f} {unit}/s, {counts.get('audio_seconds', 0) / 3600 / seconds:.4f} h audio/s",
    )
    return table

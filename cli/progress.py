"""Rich progress bars behind the small ``progress(description, total)`` protocol of the learner."""
from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


class _Bar:
    def __init__(self, progress: Progress, task_id):
        self._p, self._id = progress, task_id

    def advance(self, n: int = 1) -> None:
        self._p.advance(self._id, n)


@contextmanager
def progress_bar(description: str, total: int):
    with Progress(TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as p:
        yield _Bar(p, p.add_task(description, total=total))

"""Progress output: status lines and byte progress bars on stderr.

Kept apart from the commands so stdout stays machine-readable (message ids,
tables) while people still see what is happening.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

import click
from tqdm import tqdm


def say(text: str) -> None:
    """One status line for the person at the terminal (stderr)."""
    click.echo(text, err=True)


@contextlib.contextmanager
def byte_bar(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A bytes progress bar; yields the function to report transferred bytes.

    Drawn only on a terminal (tqdm's `disable=None`), so logs and CI output
    stay clean.
    """
    with tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
              file=sys.stderr, disable=None, leave=False) as bar:
        yield bar.update


@contextlib.contextmanager
def count_bar(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A progress bar counting items (jobs, files)."""
    with tqdm(total=total, desc=label, unit="", file=sys.stderr, disable=None, leave=False) as bar:
        yield bar.update


class LazyBar:
    """A byte progress bar created once the total is known (a download learns it from the run records)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._cm = None
        self._advance: Callable[[int], None] | None = None

    def start(self, total: int) -> None:
        self._cm = byte_bar(total, self.label)
        self._advance = self._cm.__enter__()

    def advance(self, n: int) -> None:
        if self._advance:
            self._advance(n)

    def close(self) -> None:
        if self._cm:
            self._cm.__exit__(None, None, None)

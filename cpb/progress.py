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

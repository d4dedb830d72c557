"""What every command shares: the path type, one-line failures, SIGTERM as Ctrl-C, input checks."""
from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path

import click

from finephys.errors import InputError

PATH = click.Path(path_type=Path)


def fail(message: str) -> None:
    """One line on stderr and exit status 2."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM stops a run the way Ctrl-C does, so its outputs are finished cleanly."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    return path

"""What every command shares: the path type, one-line failures, SIGTERM as Ctrl-C, stopping a
generation at a step boundary, input checks."""
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


class StopAtStep:
    """Ctrl-C and SIGTERM during a generation: the first one sets a flag that the sampler reads
    between denoising steps (pass this object as its ``should_stop``), so the run stops at the
    next step boundary with its outputs finished; a second one stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.signum = None

    def __call__(self) -> bool:
        return self.signum is not None

    @contextlib.contextmanager
    def installed(self):
        def handler(signum, frame):
            if self.signum is not None:
                raise KeyboardInterrupt
            self.signum = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    return path

"""What every command shares: the path and device types, help in sections, one-line failures,
SIGTERM as Ctrl-C, stopping a generation at a step boundary, input checks."""
from __future__ import annotations

import contextlib
import re
import signal
import sys
from pathlib import Path

import click

from finephys.errors import InputError

PATH = click.Path(path_type=Path)


class DeviceChoice(click.Choice):
    """``--device``: auto, cpu, cuda, or cuda:N (one GPU of several)."""

    def __init__(self):
        super().__init__(("auto", "cpu", "cuda"))

    def get_metavar(self, param, ctx=None) -> str:  # click < 8.2 passes no ctx
        return "[auto|cpu|cuda|cuda:N]"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and (value in self.choices or re.fullmatch(r"cuda:\d+", value)):
            return value
        self.fail(f"{value!r}, expected auto, cpu, cuda or cuda:N", param, ctx)


class SectionedCommand(click.Command):
    """A command whose --help lists options under headings: ``sections`` is a list of (heading,
    parameter names) shown first, in order; the other options follow under "Options"."""

    def __init__(self, *args, sections: list[tuple[str, tuple[str, ...]]] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.sections = list(sections)

    def format_options(self, ctx, formatter) -> None:
        rows = {p.name: p.get_help_record(ctx) for p in self.get_params(ctx)}
        placed = {name for _, names in self.sections for name in names}
        for heading, names in [*self.sections, ("Options", [n for n in rows if n not in placed])]:
            with formatter.section(heading):
                formatter.write_dl([rows[n] for n in names if rows.get(n)])


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

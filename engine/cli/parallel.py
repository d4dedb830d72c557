"""`fpengine generate --parallel guidance|windows|both`: the job every rank runs, rank 0 writing the
outputs; launched as local processes (``engine.distributed.launch``) or under torchrun, where the
ranks other than 0 take the job from rank 0 (``cli_follower``). See ``engine.distributed``."""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from finephys.errors import InputError

from engine.distributed import (
    DistContext, ParallelGenerationStream, init_distributed, launch, resolve_device, split_layout, under_torchrun,
)
from finephys.sampler.options import GenerateOptions
from engine.outputs import GenerateOutputs


@dataclass(frozen=True)
class CliJob:
    """What every rank of `fpengine generate --parallel` needs; rank 0 alone writes the outputs."""

    mode: str
    opts: GenerateOptions
    clip: object  # PoseClip
    ckpt: Path | None
    engine: Path | None
    backend: str
    outputs: GenerateOutputs


def _cli_worker(ctx: DistContext, job: CliJob):
    import click

    from engine.load import load_model

    if ctx.rank:  # only rank 0 answers an interrupt; the others stop when it has gone
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    model = load_model(job.ckpt, device=str(ctx.device), engine=job.engine, backend=job.backend)
    stream = ParallelGenerationStream(model, job.clip, job.opts, ctx, job.mode)
    if ctx.rank:
        for _ in stream.chunks():
            pass
        return None
    log = lambda line: click.echo(line, err=True)  # noqa: E731
    job.outputs.write_poses(stream, log)
    stopping = []

    def on_signal(signum, frame):
        if not stopping:  # the first signal stops the run; later ones must not break the mp4's close
            stopping.append(signum)
            raise KeyboardInterrupt

    def frames():
        try:
            yield from stream
        except Exception:
            if stopping:  # a peer gone under an interrupt: the interrupt is what happened
                raise KeyboardInterrupt from None
            raise

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        how = f"{job.mode} over {ctx.world_size} {ctx.device.type} processes"
        count, interrupted = job.outputs.write_frames(frames(), stream, log, how)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return {"frames": count, "interrupted": interrupted}


def _check_world(gpus: int | None) -> None:
    world = int(os.environ["WORLD_SIZE"])
    if gpus is not None and gpus != world:
        raise InputError(f"--gpus {gpus}: under torchrun the processes are torchrun's ({world})")


def cli_follower(gpus: int | None, device: str) -> None:
    """Under torchrun on a rank other than 0: take the job from rank 0, run this rank's share,
    exit. Elsewhere return at once (rank 0, or not under torchrun: the caller goes on)."""
    if not under_torchrun() or int(os.environ["RANK"]) == 0:
        return
    _check_world(gpus)
    ctx = init_distributed(device)
    job = [None]
    dist.broadcast_object_list(job, src=0)
    _cli_worker(ctx, job[0])
    dist.destroy_process_group()
    sys.exit(0)


def cli_generate(job: CliJob, gpus: int | None, device: str) -> None:
    """Run ``job``: as rank 0 under torchrun, else over ``gpus`` (default 2) new local processes."""
    import click

    if gpus is not None and gpus < 2:
        raise InputError(f"--gpus {gpus}: expected 2 or more processes with --parallel")
    if under_torchrun():
        _check_world(gpus)
        split_layout(job.mode, int(os.environ["WORLD_SIZE"]))
        ctx = init_distributed(device)
        dist.broadcast_object_list([job], src=0)
        result = _cli_worker(ctx, job)
        dist.destroy_process_group()
    else:
        n = 2 if gpus is None else gpus
        split_layout(job.mode, n)
        _, note = resolve_device(device, n)
        if note:
            click.echo(note, err=True)

        def term(signum, frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, term)
        try:
            result = launch(_cli_worker, n, (job,), device=device)
        except KeyboardInterrupt:
            result = {"interrupted": True}
        finally:
            signal.signal(signal.SIGTERM, previous)
    if result["interrupted"]:
        sys.exit(130)

"""``fpengine serve``: the engine as an HTTP service on Ray Serve."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

import click

from finephys.errors import InputError

from engine.cli.common import PATH


@click.command()
@click.option("--ckpt", type=PATH, default=None, help="FinePhys checkpoint folder (default: embedded demo model).")
@click.option("--engine", type=PATH, default=None, help="Engine directory from `fpengine export` (instead of --ckpt).")
@click.option("--backend", type=click.Choice(["auto", "reference", "onnxruntime", "tensorrt", "triton"]), default="auto",
              show_default=True, help="With --engine: the runtime each replica uses (triton loads precompiled steps).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto (CUDA where a replica has a GPU).")
@click.option("--replicas", type=int, default=0, help="Model replicas (default: one per GPU of the cluster, else 1).")
@click.option("--replica-cpus", type=float, default=1.0, show_default=True,
              help="Ray CPUs (and torch threads) per replica.")
@click.option("--replica-gpus", type=float, default=-1.0,
              help="Ray GPUs per replica (default -1: one where the cluster has GPUs, else 0).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the HTTP proxy listens on.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--address", default=None,
              help="Join this Ray cluster (e.g. auto or HEAD_IP:6379) instead of starting a local one.")
@click.option("--workdir", type=PATH, default=None,
              help="Working folder for the service's files (default: a new temporary folder, removed at exit).")
@click.option("--max-batch-size", type=int, default=4, show_default=True,
              help="Requests of one shape denoised together (with --engine: at most what its profile and "
                   "packages run as one batch).")
@click.option("--batch-wait-ms", type=float, default=50.0, show_default=True,
              help="How long a replica waits to fill a batch.")
@click.option("--max-ongoing", type=int, default=0, help="Requests one replica holds (default: 2 x --max-batch-size).")
@click.option("--max-queue", type=int, default=16, show_default=True,
              help="Requests waiting for a replica; beyond it: 503.")
@click.option("--max-upload-mb", type=float, default=16.0, show_default=True, help="Largest request body.")
@click.option("--max-frames", type=int, default=256, show_default=True, help="Most frames one request may ask for.")
@click.option("--max-side", type=int, default=1024, show_default=True, help="Largest height or width.")
@click.option("--max-steps", type=int, default=100, show_default=True, help="Most denoising steps.")
@click.option("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: this machine's).")
@click.option("--object-store-mb", type=int, default=None,
              help="Object store of the local Ray instance (default: Ray's).")
@click.option("--drain-s", type=float, default=30.0, show_default=True,
              help="On Ctrl-C or SIGTERM: how long requests already accepted may take to finish "
                   "(new ones get 503 meanwhile); a second signal stops at once.")
def serve(ckpt, engine, backend, device, replicas, replica_cpus, replica_gpus, host, port, address, workdir, max_batch_size,
          batch_wait_ms, max_ongoing, max_queue, max_upload_mb, max_frames, max_side, max_steps, num_cpus,
          object_store_mb, drain_s):
    """Serve generation over HTTP on Ray Serve (a local Ray instance, or --address CLUSTER).

    POST /generate takes JSON options (prompt, negative_prompt, num_frames, height, width,
    num_inference_steps, guidance_scale, seed, context_length, context_stride, deep_cache,
    deep_cache_depth) with the clip as a 'clip' object of clip.npz keys, or multipart parts
    'options' (JSON) and 'clip' (clip.npz); it streams the mp4 back. GET /healthz, GET /metrics
    (Prometheus), GET / (service info). Ctrl-C or SIGTERM stops the service and the local Ray
    instance, once the requests already accepted have finished (at most --drain-s seconds).
    """
    from engine.serve.config import MIB, Limits, ModelSpec, ServeConfig
    from engine.serve.launch import check, start

    if not 0 < max_upload_mb <= MIB:
        raise InputError(f"--max-upload-mb {max_upload_mb:g}: expected a number > 0 and <= {MIB}")
    if not 0 <= drain_s <= 3600:
        raise InputError(f"--drain-s {drain_s:g}: expected 0..3600")
    limits = Limits(max_upload_bytes=math.ceil(max_upload_mb * MIB), max_frames=max_frames, max_side=max_side,
                    max_steps=max_steps)
    config = ServeConfig(
        model=ModelSpec(ckpt=None if ckpt is None else str(ckpt), device=device,
                        engine=None if engine is None else str(engine), backend=backend),
        replicas=replicas, replica_cpus=replica_cpus, replica_gpus=replica_gpus, max_batch_size=max_batch_size,
        batch_wait_s=batch_wait_ms / 1000.0, max_ongoing=max_ongoing, max_queue=max_queue, limits=limits,
    )
    check(config, host=host, port=port, address=address, num_cpus=num_cpus, object_store_mb=object_store_mb)
    own = workdir is None  # every input checked: now the working folder
    root = Path(tempfile.mkdtemp(prefix="fpengine-serve-")) if own else workdir
    config = dataclasses.replace(config, workdir=str(root))
    signals = _Signals()
    previous = {s: signal.signal(s, signals) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            with signals.quiet_swallowed_interrupts():
                service = start(config, host=host, port=port, address=address, num_cpus=num_cpus,
                                object_store_mb=object_store_mb, own_workdir=own, interrupted=signals.stop.is_set)
        except BaseException as exc:
            if own:
                shutil.rmtree(root, ignore_errors=True)
            if isinstance(exc, KeyboardInterrupt):
                _exit_interrupted()
            raise
        if signals.stop.is_set():  # a signal while starting whose KeyboardInterrupt was swallowed
            service.stop()
            _exit_interrupted()
        try:
            signals.serving = True
            c = service.config
            click.echo(f"serving {c.model.name} on {service.url} ({c.replicas} replica(s), "
                       f"{c.replica_cpus:g} CPU / {c.replica_gpus:g} GPU each, working folder {c.workdir}); "
                       f"Ctrl-C stops", err=True)
            while not signals.stop.wait(0.5):
                pass
            click.echo(f"stopping: new requests get 503, those accepted have up to {drain_s:g} s "
                       f"(Ctrl-C again stops now)", err=True)
            try:
                left = service.drain(drain_s, signals.now)
            except Exception as exc:  # Ray or the front end already gone: stop anyway
                click.echo(f"stopping without draining ({type(exc).__name__}: {exc})", err=True)
                left = 0
            if left:
                click.echo(f"stopping with {left} request(s) unfinished", err=True)
        finally:
            service.stop()
        click.echo("stopped", err=True)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _exit_interrupted():
    """Ctrl-C or SIGTERM while starting: start() has stopped Ray and removed its files. Exit
    without the interpreter's teardown, which can crash (SIGSEGV) on a Ray driver interrupted
    inside ray.init."""
    click.echo("error: interrupted while starting", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)


class _Signals:
    """Ctrl-C and SIGTERM. While the service starts they interrupt it (KeyboardInterrupt: start()
    stops what it began and removes what it made); once it serves, the first one sets ``stop``
    (drain, then stop), a second one ``now`` (stop without waiting)."""

    def __init__(self):
        self.serving = False
        self.stop, self.now = threading.Event(), threading.Event()

    def __call__(self, signum, frame):
        if not self.serving:  # recorded too: code that ignores exceptions can swallow the interrupt
            self.stop.set()
            raise KeyboardInterrupt
        (self.now if self.stop.is_set() else self.stop).set()

    @contextlib.contextmanager
    def quiet_swallowed_interrupts(self):
        """While starting, an interrupt raised where Python can only ignore it (a fork hook, a
        finaliser) would print "Exception ignored in ..." and a stack dump; ``stop`` holds it
        anyway, so drop those, and pass every other unraisable exception on."""
        previous = sys.unraisablehook

        def hook(info):
            if not (isinstance(info.exc_value, KeyboardInterrupt) and self.stop.is_set()):
                previous(info)

        sys.unraisablehook = hook
        try:
            yield
        finally:
            sys.unraisablehook = previous

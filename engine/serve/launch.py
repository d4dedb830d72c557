"""Starting and stopping the service: Ray (a local instance, or an existing cluster joined by
address), Serve's HTTP proxy on ``host:port``, and the application of ``app.build_app``.

A local Ray instance is private to the service: its ports listen on loopback only, its session
folders lie in ``<workdir>/ray`` (or, where that path is too long for Ray's sockets, a short
folder in the system temp folder), and both go when the service stops, also when it is
interrupted while it starts."""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from finephys.errors import InputError

from engine.serve.config import MIB, ServeConfig
from engine.serve.files import clean_workdir, prepare_workdir

APP_NAME = "fpengine"
NAMESPACE = "fpengine"
# Nothing leaves the machine: no usage reports; no dashboard (ray.init below).
RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
}
# A local instance is for this service alone: with this, Ray takes 127.0.0.1 as the node's
# address and every Ray server (GCS, raylet, workers, agents) listens there only. Set it to 1
# in the environment to open the instance to other hosts.
LOCAL_RAY_ENV_DEFAULTS = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Ray puts AF_UNIX sockets at <temp dir>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store;
# such a path has at most 107 bytes on Linux (Ray checks the same).
SOCKET_PATH_MAX = 107
SESSION_SOCKET = len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")


def ray_temp_dir(workdir: Path) -> Path:
    """Where a local Ray instance keeps its session folders: ``workdir/ray``, or, if Ray's
    socket paths under it would be too long, a new short folder in the system temp folder
    (or /tmp). The caller removes it when Ray has stopped."""
    inside_workdir = Path(workdir) / "ray"
    if len(os.fsencode(inside_workdir)) + SESSION_SOCKET <= SOCKET_PATH_MAX:
        if inside_workdir.is_symlink():
            raise InputError(f"--workdir {workdir}: ray is a symlink, expected a plain folder")
        inside_workdir.mkdir(mode=0o700, exist_ok=True)
        return inside_workdir
    for base in (tempfile.gettempdir(), "/tmp"):
        if len(os.fsencode(base)) + len("/fpray-12345678") + SESSION_SOCKET <= SOCKET_PATH_MAX:
            return Path(tempfile.mkdtemp(prefix="fpray-", dir=base))
    raise InputError(f"--workdir {workdir}: too long a path for Ray's sockets, and so is the "
                     f"temp folder {tempfile.gettempdir()}; pass a shorter --workdir")


def resolve(config: ServeConfig, resources: dict) -> ServeConfig:
    """Fill in the automatic choices from the cluster's resources: on a cluster with GPUs (and a
    model on ``auto`` or ``cuda``) one replica per GPU, each holding one GPU; else 1 CPU replica."""
    gpus = int(resources.get("GPU", 0))
    spec = config.model
    spec.check_gpus(gpus, "the Ray cluster")
    replica_gpus = config.replica_gpus
    if replica_gpus < 0:
        replica_gpus = 1.0 if gpus and spec.device != "cpu" else 0.0
    replicas = config.replicas or (max(1, int(gpus // replica_gpus)) if replica_gpus else 1)
    return dataclasses.replace(config, replicas=replicas, replica_gpus=replica_gpus)


def _check_port(host: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise InputError(f"--port {port}: expected 1..65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InputError(f"--host {host}: cannot be resolved ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise InputError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None


def check(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          num_cpus: int | None = None, object_store_mb: int | None = None) -> None:
    """What ``start`` checks before it makes or starts anything: every setting, the model's
    source, and for a local Ray instance its sizes, the port and this machine's GPUs."""
    config.check()
    if address:
        if num_cpus is not None or object_store_mb is not None:
            raise InputError("--num-cpus and --object-store-mb size a local Ray instance; with --address "
                             "the cluster's own sizes apply")
        return
    _check_port(host, port)
    if num_cpus is not None and num_cpus < 1:
        raise InputError(f"--num-cpus {num_cpus}: expected a positive integer")
    if object_store_mb is not None and object_store_mb < 80:
        raise InputError(f"--object-store-mb {object_store_mb}: expected at least 80 (Ray's minimum)")
    cpus = num_cpus if num_cpus is not None else os.cpu_count() or 1
    if config.replica_cpus > cpus:  # a replica's torch threads; more than the instance has only oversubscribes it
        raise InputError(f"--replica-cpus {config.replica_cpus:g}: expected at most {cpus} "
                         f"(the CPUs of {'--num-cpus' if num_cpus is not None else 'this machine'})")
    if num_cpus is not None and config.replicas * config.replica_cpus > num_cpus:
        raise InputError(f"--replicas {config.replicas} x --replica-cpus {config.replica_cpus:g} needs "
                         f"{config.replicas * config.replica_cpus:g} CPUs, --num-cpus is {num_cpus}")
    if config.model.wants_gpu():
        import torch

        config.model.check_gpus(torch.cuda.device_count(), "this machine")


def _stop_ray(local: bool, ray_dir: Path | None) -> None:
    """Stop Serve (the application only, on a cluster), disconnect, and on a local instance
    stop Ray's processes and remove its session folders."""
    if "ray" not in sys.modules:  # interrupted before Ray was imported
        if ray_dir is not None:
            shutil.rmtree(ray_dir, ignore_errors=True)
        return
    import ray
    from ray import serve

    try:
        if ray.is_initialized():
            if local:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)  # leave the cluster and its other applications running
    finally:
        ray.shutdown()
        if ray_dir is not None:
            shutil.rmtree(ray_dir, ignore_errors=True)


@dataclass
class Service:
    """A running service; ``drain()`` lets its requests finish, ``stop()`` ends it (and the
    local Ray instance, if it started one)."""

    url: str
    config: ServeConfig
    local: bool
    own_workdir: bool
    ray_dir: Path | None = None

    def drain(self, seconds: float, now: threading.Event | None = None) -> int:
        """Refuse new requests (503) and wait up to ``seconds`` (or until ``now`` is set) for
        the accepted ones to finish; returns how many are still running."""
        from ray import serve

        from engine.serve.app import API

        front = serve.get_deployment_handle(API, APP_NAME)
        front.drain.remote().result(timeout_s=30)
        deadline = time.monotonic() + seconds
        while True:
            left = front.pending.remote().result(timeout_s=30)
            if not left or time.monotonic() >= deadline or (now is not None and now.is_set()):
                return left
            (now or threading.Event()).wait(min(0.2, max(0.0, deadline - time.monotonic())))

    def stop(self) -> None:
        try:
            _stop_ray(self.local, self.ray_dir)
        finally:
            root = Path(self.config.workdir)
            shutil.rmtree(root, ignore_errors=True) if self.own_workdir else clean_workdir(root)


def _init_ray(interrupted=None, **kwargs) -> None:
    """``ray.init``, keeping the caller's SIGTERM handler: ray.init installs its own (which
    exits, or tears Ray down under a running Serve), and in this process Ray's C++ failure
    handler would turn SIGTERM into an abort with a stack dump. A SIGTERM while Ray starts
    becomes KeyboardInterrupt, like Ctrl-C."""
    import ray
    from ray._private import ray_constants

    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True  # this process only; replicas keep theirs
    if "address" not in kwargs:  # the constant behind LOCAL_RAY_ENV_DEFAULTS, if Ray was imported before
        flag = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0").lower()
        ray_constants.ENABLE_RAY_CLUSTER = flag in ("1", "true")
    from ray._private import utils as ray_utils

    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    # Ray's own handler (sys.exit) can fire inside code that ignores exceptions (a fork hook),
    # and the SIGTERM is lost: the caller's handler stays in place while Ray starts instead
    install = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda _handler: None
    try:
        ray.init(**kwargs)
    except SystemExit:  # a SIGTERM handler Ray installs elsewhere ends in sys.exit
        raise KeyboardInterrupt from None
    finally:
        ray_utils.set_sigterm_handler = install
        if main:
            signal.signal(signal.SIGTERM, handler)
    if interrupted is not None and interrupted():  # the handler ran, but its interrupt was swallowed
        raise KeyboardInterrupt


def start(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          num_cpus: int | None = None, object_store_mb: int | None = None, own_workdir: bool = False,
          log_to_driver: bool = True, interrupted=None) -> Service:
    """Check (``check``), then start (or join) Ray, then Serve, then the application; returns once
    it answers. ``interrupted()`` says whether a signal handler asked to stop (checked after Ray starts)."""
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    check(config, host, port, address, num_cpus, object_store_mb)
    local = not address
    root = prepare_workdir(config.workdir)
    ray_dir = ray_temp_dir(root) if local else None
    try:
        if local:
            for key, value in LOCAL_RAY_ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)
        import ray
        from ray import serve

        from engine.serve.app import build_app

        if local:
            want = max(1, math.ceil(max(config.replicas, 1) * config.replica_cpus))
            _init_ray(interrupted, namespace=NAMESPACE, include_dashboard=False, log_to_driver=log_to_driver,
                      num_cpus=num_cpus if num_cpus is not None else max(os.cpu_count() or 1, want),
                      object_store_memory=None if object_store_mb is None else object_store_mb * MIB,
                      _temp_dir=str(ray_dir))
        else:
            _init_ray(interrupted, address=address, namespace=NAMESPACE, log_to_driver=log_to_driver)
        config = resolve(config, ray.cluster_resources())
        config.check()
        cpus = ray.cluster_resources().get("CPU", 0)
        if config.replicas * config.replica_cpus > cpus + 1e-9:
            raise InputError(f"--replicas {config.replicas} x --replica-cpus {config.replica_cpus:g} "
                             f"needs {config.replicas * config.replica_cpus:g} CPUs, the Ray cluster has {cpus:g}")
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    except BaseException:
        try:
            _stop_ray(local, ray_dir)
        finally:
            clean_workdir(root)  # what the replicas made while they started
        raise
    shown = f"[{host}]" if ":" in host else host
    return Service(url=f"http://{shown}:{port}", config=config, local=local, own_workdir=own_workdir,
                   ray_dir=ray_dir)

"""Starting and stopping the service: Ray (a local instance, or an existing cluster joined by
address), Serve's HTTP proxy on ``host:port``, and the application of ``app.build_app``."""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import socket
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


def resolve(config: ServeConfig, resources: dict) -> ServeConfig:
    """Fill in the automatic choices from the cluster's resources: on a cluster with GPUs (and a
    model on ``auto`` or ``cuda``) one replica per GPU, each holding one GPU; else 1 CPU replica."""
    gpus = int(resources.get("GPU", 0))
    spec = config.model
    if spec.wants_gpu() and gpus == 0:
        raise InputError(f"--device {spec.device}: the Ray cluster has no GPU, expected cpu or auto")
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


@dataclass
class Service:
    """A running service; ``stop()`` ends it (and the local Ray instance, if it started one)."""

    url: str
    config: ServeConfig
    local: bool
    own_workdir: bool

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            if self.local:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)  # leave the cluster and its other applications running
        finally:
            ray.shutdown()
            root = Path(self.config.workdir)
            shutil.rmtree(root, ignore_errors=True) if self.own_workdir else clean_workdir(root)


def start(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          num_cpus: int | None = None, object_store_mb: int | None = None, own_workdir: bool = False,
          log_to_driver: bool = True) -> Service:
    """Start (or join) Ray, then Serve, then the application; returns once it answers."""
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    config.model.check()
    local = not address
    if local:
        _check_port(host, port)
        if num_cpus is not None and num_cpus < 1:
            raise InputError(f"--num-cpus {num_cpus}: expected a positive integer")
        if object_store_mb is not None and object_store_mb < 80:
            raise InputError(f"--object-store-mb {object_store_mb}: expected at least 80 (Ray's minimum)")
    elif num_cpus is not None or object_store_mb is not None:
        raise InputError("--num-cpus and --object-store-mb size a local Ray instance; with --address "
                         "the cluster's own sizes apply")
    prepare_workdir(config.workdir)
    import ray
    from ray import serve

    from engine.serve.app import build_app

    if local:
        want = max(1, math.ceil(max(config.replicas, 1) * config.replica_cpus))
        ray.init(namespace=NAMESPACE, include_dashboard=False, log_to_driver=log_to_driver,
                 num_cpus=num_cpus if num_cpus is not None else max(os.cpu_count() or 1, want),
                 object_store_memory=None if object_store_mb is None else object_store_mb * MIB)
    else:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=log_to_driver)
    try:
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
            serve.shutdown() if local else None
        finally:
            ray.shutdown()
        raise
    shown = f"[{host}]" if ":" in host else host
    return Service(url=f"http://{shown}:{port}", config=config, local=local, own_workdir=own_workdir)

"""What a running service is: the model each replica loads, the Ray Serve deployment settings,
and the limits every request is held to. Frozen dataclasses, serialised to JSON by ``to_dict``."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from finephys.errors import InputError

MIB = 1024 * 1024


@dataclass(frozen=True)
class ModelSpec:
    """The one place the service names its model source; replicas call ``load()``, the HTTP
    front end calls ``config()`` (no weights) to validate requests before they are queued.

    ``ckpt``: a FinePhys checkpoint folder, or None for the embedded demo model.
    ``engine``: instead, an engine directory (``fpengine export``) run on ``backend`` (``auto``:
    the fastest one the replica has; ``triton`` loads the engine's precompiled UNet steps).
    ``device``: ``auto`` (CUDA where the replica has a GPU), ``cpu`` or ``cuda``.
    """

    ckpt: str | None = None
    device: str = "auto"
    engine: str | None = None
    backend: str = "auto"

    def check(self) -> None:
        if self.ckpt is not None and self.engine is not None:
            raise InputError("pass --ckpt or --engine, not both (an engine directory names its checkpoint)")
        if self.ckpt is not None and not Path(self.ckpt).exists():
            raise InputError(f"--ckpt {self.ckpt} does not exist")
        if self.ckpt is not None:
            self.config()  # a FinePhys checkpoint folder (its manifest; no weights read)
        if self.engine is not None:
            from engine.backends import ENGINE_BACKENDS

            self.config()  # a readable engine directory of this format
            if self.backend not in ENGINE_BACKENDS + ("auto",):
                raise InputError(f"--backend {self.backend}: an engine directory runs on "
                                 f"{', '.join(ENGINE_BACKENDS)} or auto")
        elif self.backend not in ("auto", "reference"):
            raise InputError(f"--backend {self.backend} runs an engine directory: pass --engine DIR")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise InputError(f"--device {self.device}: expected auto, cpu, cuda or cuda:N")

    @property
    def name(self) -> str:
        if self.engine is not None:
            return f"{self.engine} ({self.backend} backend)"
        return "demo" if self.ckpt is None else str(self.ckpt)

    def config(self):
        """The model's FinePhysConfig, read without loading any weights."""
        from finephys.model.config import FinePhysConfig

        if self.engine is not None:
            from export.manifest import engine_config, read_engine_manifest

            return engine_config(read_engine_manifest(Path(self.engine)))
        if self.ckpt is None:
            from finephys.model.demo import demo_config

            return demo_config()
        from finephys.model.checkpoint import read_config

        return read_config(Path(self.ckpt))

    def load(self, log=print):
        """The model a replica runs (the backend contract of ``finephys.model.backend``), warmed up:
        the triton backend loads and graph-captures its precompiled steps, then one short request
        of each precompiled shape runs end to end (``engine.serve.warmup``), before the first
        request."""
        from engine.load import load_model, pick_device
        from engine.serve.warmup import warm_up_requests

        if self.engine is not None:
            model = load_model(None, device=self.device, engine=Path(self.engine), backend=self.backend)
        else:
            model = load_model(None if self.ckpt is None else Path(self.ckpt), device=pick_device(self.device))
        model.warm_up()
        warm_up_requests(model, log=log)
        return model

    def wants_gpu(self) -> bool:
        return self.device.startswith("cuda") or (self.engine is not None and self.backend in ("triton", "tensorrt"))

    def check_gpus(self, gpus: int, where: str) -> None:
        """Refuse a model that runs on a GPU where there is none (``where``: this machine, the Ray cluster)."""
        if gpus or not self.wants_gpu():
            return
        if self.device.startswith("cuda"):
            raise InputError(f"--device {self.device}: {where} has no GPU, expected cpu or auto")
        raise InputError(f"--backend {self.backend}: runs on a GPU and {where} has none, expected onnxruntime or auto")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything larger is refused before it is queued."""

    max_upload_bytes: int = 16 * MIB  # the whole request body (JSON or multipart)
    max_clip_bytes: int = 64 * MIB  # a clip.npz unpacked
    max_clip_frames: int = 4096  # frames of the uploaded clip
    max_frames: int = 256  # frames generated
    max_side: int = 1024  # height and width
    max_steps: int = 100  # denoising steps

    def check(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v < 1:
                raise InputError(f"--{f.name.replace('_', '-')} {v}: expected a positive integer")


@dataclass(frozen=True)
class ServeConfig:
    """One Ray Serve application: ``replicas`` copies of the model behind one HTTP front end."""

    model: ModelSpec = field(default_factory=ModelSpec)
    workdir: str = "fpengine-serve"  # every file the service writes lies under it
    replicas: int = 1  # 0 = one per GPU of the cluster when the model runs on CUDA, else 1 (launch.resolve)
    replica_cpus: float = 1.0  # Ray CPUs per replica (also its torch threads, at least 1)
    replica_gpus: float = 0.0  # Ray GPUs per replica (1 = one replica per GPU); -1 = auto (launch.resolve)
    max_batch_size: int = 4  # requests of one shape denoised together
    batch_wait_s: float = 0.05  # how long a replica waits to fill a batch
    max_ongoing: int = 0  # requests one replica holds (running + waiting for the next batch); 0 = 2 x batch
    max_queue: int = 16  # requests waiting for a replica, over all replicas; beyond it: 503
    crf: int = 18  # libx264 quality of the streamed mp4
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self):
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", ModelSpec(**self.model))
        if isinstance(self.limits, dict):
            object.__setattr__(self, "limits", Limits(**self.limits))

    def check(self) -> None:
        """Every setting, before anything starts; the automatic ``replicas`` 0 and ``replica_gpus``
        -1 pass (``launch.resolve`` fills them in)."""
        self.model.check()
        self.limits.check()
        if not isinstance(self.replicas, int) or self.replicas < 0:
            raise InputError(f"--replicas {self.replicas}: expected a positive integer (or 0 for automatic)")
        if not (self.replica_cpus > 0 and math.isfinite(self.replica_cpus)):
            raise InputError(f"--replica-cpus {self.replica_cpus:g}: expected a number > 0")
        if not (self.replica_gpus == -1 or self.replica_gpus >= 0 and math.isfinite(self.replica_gpus)):
            raise InputError(f"--replica-gpus {self.replica_gpus:g}: expected a number >= 0 (or -1 for automatic)")
        if not 1 <= self.max_batch_size <= 64:
            raise InputError(f"--max-batch-size {self.max_batch_size}: expected 1..64")
        if not 0 <= self.batch_wait_s <= 10:
            raise InputError(f"--batch-wait-ms {self.batch_wait_s * 1000:g}: expected 0..10000")
        if self.max_ongoing < 0:
            raise InputError(f"--max-ongoing {self.max_ongoing}: expected a number >= 0 (0 = 2 x batch)")
        if not isinstance(self.max_queue, int) or self.max_queue < 1:
            raise InputError(f"--max-queue {self.max_queue}: expected a positive integer (the queue is bounded)")
        if not 0 <= self.crf <= 51:
            raise InputError(f"crf {self.crf}: expected 0..51")

    @property
    def ongoing_per_replica(self) -> int:
        return self.max_ongoing or 2 * self.max_batch_size

    @property
    def capacity(self) -> int:
        """Requests the service holds at once (running or waiting); the next one gets 503."""
        return self.replicas * self.ongoing_per_replica + self.max_queue

    @property
    def work(self) -> Path:
        return Path(self.workdir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

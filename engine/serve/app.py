"""The Ray Serve application.

``Generator``: one model per replica (one replica per GPU, or CPU replicas for the demo model).
Requests reach it through a ``Batcher``: when the model is free, the requests waiting (up to
``max_batch_size``, waiting up to ``batch_wait_s`` for more) form a batch, split by shape
(``Plan.shape_key``) into groups of at most what the model runs as one batch (``fits_batch``:
an engine's profile and precompiled packages); each group
is denoised as one batch, the groups take turns window by window, and every finished frame range
is encoded into the request's own fragmented mp4 and streamed out at once.

``Api``: the FastAPI ingress. It reads the body (bounded), parses and checks it exactly as the CLI
would (``parse.py``, with the model's config only), then calls a ``Generator`` replica through a
streaming handle. The front end (one replica) admits at most ``replicas x max_ongoing +
max_queue`` requests at once, counted as they arrive; past that the client gets 503 with
``Retry-After`` at once. (Ray Serve's own ``max_queued_requests`` counts requests its router has
not yet placed, so a burst within capacity could be refused while the router asked the replicas
for their queue lengths; it stays only as a backstop.) A request whose replica died before its
first frame gets 503 too, and so does every request once the service drains (``drain``: those
accepted finish, ``pending`` counts them).
"""

import asyncio
import logging
import os
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from finephys.sampler.options import GenerateOptions
from finephys.poses.clip import PoseClip
from finephys.errors import InputError

from engine.serve.batcher import Batcher
from engine.serve.batching import group_by_shape, run_group
from engine.serve.config import ServeConfig
from engine.serve.files import prepare_workdir
from engine.serve.http import error as _error, install
from engine.serve import metrics as front_metrics
from engine.serve.mp4 import Mp4Stream
from engine.serve.parse import OPTIONS, PayloadTooLarge, RequestError, check_request, parse_request

log = logging.getLogger("ray.serve")
GENERATOR = "Generator"
API = "Api"


@dataclass(eq=False)
class Job:
    """One request as a replica sees it; ``cancelled`` is set once nobody reads its output."""

    clip: PoseClip
    opts: GenerateOptions
    request_id: str
    cancelled: bool = False


@dataclass(eq=False)
class Header:
    """The first item of every stream: what the video will be."""

    frames: int
    height: int
    width: int
    fps: float
    notes: list
    batch_size: int
    replica: str


@dataclass(eq=False)
class Chunk:
    frames: object  # (F,H,W,3) uint8


def grpc_on_loopback() -> None:
    """Ray Serve (2.60) starts in every replica, after its constructor, a gRPC server for calls
    between deployments on ``[::]:0`` (every interface), with no option to change it. On a local
    instance (the node's address is 127.0.0.1: ``launch.LOCAL_RAY_ENV_DEFAULTS``) this binds it to
    loopback like every other Ray port; elsewhere, or if Serve's code differs, it does nothing."""
    import ray
    from ray.serve._private import replica

    add_port = getattr(replica, "add_port_to_grpc_server", None)
    if add_port is None or getattr(add_port, "loopback", False) or ray.util.get_node_ip_address() != "127.0.0.1":
        return

    def on_loopback(server, address: str):
        return add_port(server, "127.0.0.1:" + address[5:] if address.startswith("[::]:") else address)

    on_loopback.loopback = True
    replica.add_port_to_grpc_server = on_loopback


class Generator:
    def __init__(self, config: ServeConfig):
        import torch

        grpc_on_loopback()
        self.config = config
        self.root = prepare_workdir(config.workdir)
        tempfile.tempdir = str(self.root / "tmp")  # library temp files stay in the working folder too
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.root / "cache"))  # else it lands in tmp
        torch.set_num_threads(max(1, round(config.replica_cpus)))
        self.model = config.model.load(log=log.info)
        self.batcher = Batcher(self._rounds, config.max_batch_size, config.batch_wait_s)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.batch_sizes: Counter = Counter()

    def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("no model loaded")

    def stats(self) -> dict:
        return {"replica": self.replica, "batch_sizes": dict(self.batch_sizes)}

    def _prepare(self, jobs: list[Job]) -> list:
        """A GenerationStream (pose stack done) or the exception, per job."""
        from finephys.sampler.stream import generate_stream

        out = []
        for job in jobs:
            try:
                out.append(None if job.cancelled else generate_stream(self.model, job.clip, job.opts, progress=False))
            except Exception as exc:  # InputError, or a failure that belongs to this job only
                out.append(exc)
        return out

    async def _rounds(self, jobs: list[Job]):
        """Yields one list per round, an item per job: Header / Chunk / exception / StopIteration."""
        streams = await asyncio.to_thread(self._prepare, jobs)
        groups = group_by_shape([s if not isinstance(s, BaseException) else None for s in streams])
        size = {i: len(g) for g in groups for i in g}
        for g in groups:
            self.batch_sizes[len(g)] += 1
        log.info("batch of %d request(s) in %d shape group(s): %s", len(jobs), len(groups),
                 [len(g) for g in groups])
        yield [
            s if isinstance(s, BaseException) else StopIteration if s is None else
            Header(s.plan.frames, s.plan.height, s.plan.width, s.fps, list(s.notes), size[i], self.replica)
            for i, s in enumerate(streams)
        ]
        runs = [(g, run_group([streams[i] for i in g])) for g in groups]
        while runs:
            out, alive = [StopIteration] * len(jobs), []
            for g, frames_iter in runs:
                if all(jobs[i].cancelled for i in g):
                    frames_iter.close()
                    continue
                try:
                    chunk = await asyncio.to_thread(next, frames_iter, None)
                except Exception as exc:
                    log.exception("shape group %s failed", g)
                    for i in g:
                        out[i] = exc
                    continue
                if chunk is not None:
                    for i, frames in zip(g, chunk):
                        out[i] = Chunk(frames)
                    alive.append((g, frames_iter))
            runs = alive
            yield out

    async def generate(self, job: Job):
        """Streams a Header, then the mp4's bytes as its frames are finished."""
        video = None
        try:
            async for item in self.batcher.submit(job):
                if isinstance(item, Header):
                    video = Mp4Stream(self.root, item.fps, self.config.crf)
                    yield item
                    continue
                data = await asyncio.to_thread(video.write, item.frames)
                if data:
                    yield data
            if video is not None:
                yield await asyncio.to_thread(video.finish)
        finally:
            job.cancelled = True
            if video is not None:
                video.abort()


app = FastAPI(title="fpengine", description="FinePhys pose-guided video generation")
install(app)


def _input_error(exc: BaseException) -> InputError | None:
    """The InputError behind ``exc`` (Ray wraps errors raised in a replica), if any."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, InputError):
            return exc
        exc, seen = getattr(exc, "cause", None) or exc.__cause__, seen + 1
    return None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(f"Content-Length {declared!r}: expected a number of bytes")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body: {declared} bytes, this service takes at most {limit} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"request body: over {limit} bytes, this service takes at most {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@serve.ingress(app)
class Api:
    def __init__(self, generator, config: ServeConfig):
        grpc_on_loopback()
        self.config = config
        self.root = prepare_workdir(config.workdir)
        self.model_config = config.model.config()
        self.generator = generator.options(stream=True)
        # the module's own (not a name bound here: Serve ships this class by value, with copies of
        # the objects its code names); AnswerCounter counts into the same one
        self.metrics = front_metrics.METRICS
        self.app_name = serve.get_replica_context().app_name
        self.draining = False
        self.accepted = 0  # POST /generate requests taken and not finished (their video included)

    async def drain(self) -> None:
        """From now on POST /generate gets 503 and /healthz 503 (``launch.Service.drain``)."""
        self.draining = True

    async def pending(self) -> int:
        return self.accepted

    @app.get("/")
    async def info(self):
        c = self.model_config
        return {
            "service": "fpengine", "model": self.config.model.name,
            "defaults": {"height": c.height, "width": c.width, "num_inference_steps": c.num_inference_steps,
                         "guidance_scale": c.guidance_scale, "fps": c.fps, "layout": c.layout},
            "options": list(OPTIONS), "limits": self.config.to_dict()["limits"],
            "replicas": self.config.replicas, "max_batch_size": self.config.max_batch_size,
            "endpoints": ["POST /generate", "GET /healthz", "GET /metrics"],
        }

    async def _replicas(self) -> dict:
        status = await asyncio.to_thread(serve.status)
        dep = status.applications[self.app_name].deployments[GENERATOR]
        return {"deployment_status": str(getattr(dep.status, "value", dep.status)),
                "running": int(dep.replica_states.get("RUNNING", 0)), "target": self.config.replicas}

    @app.get("/healthz")
    async def healthz(self):
        try:
            replicas = await self._replicas()
        except Exception as exc:
            return _error(503, f"cannot read the deployment status ({type(exc).__name__}: {exc})")
        running = replicas["running"]
        status = ("stopping" if self.draining else "unavailable" if not running else
                  "degraded" if running < replicas["target"] else "ok")
        body = {"status": status, "model": self.config.model.name, "replicas": replicas}
        return JSONResponse(body, status_code=200 if status in ("ok", "degraded") else 503)

    @app.get("/metrics")
    async def metrics(self):
        extra = {}
        try:
            extra["replicas_running"] = (await self._replicas())["running"]
        except Exception:
            extra["replicas_running"] = 0
        return PlainTextResponse(self.metrics.prometheus(extra), media_type="text/plain; version=0.0.4")

    @app.get("/metrics.json")
    async def metrics_json(self):
        return self.metrics.snapshot()

    @app.post("/generate")
    async def generate(self, request: Request):
        if self.draining:
            return _error(503, "the service is stopping; retry later", **{"Retry-After": "5"})
        self.accepted += 1
        response = None
        try:
            response = await self._generate(request)
            return response
        finally:
            if not isinstance(response, StreamingResponse):  # a stream counts itself off (_relay)
                self.accepted -= 1

    async def _generate(self, request: Request):
        t0 = time.perf_counter()
        rid = uuid.uuid4().hex[:16]
        limits = self.config.limits
        try:
            body = await read_body(request, limits.max_upload_bytes)
            opts, clip = await asyncio.to_thread(
                parse_request, body, request.headers.get("content-type"), self.root, limits)
            await asyncio.to_thread(check_request, self.model_config, clip, opts, limits)
        except RequestError as exc:
            return _error(exc.status, str(exc))
        except InputError as exc:
            return _error(400, str(exc))
        if self.metrics.waiting + self.metrics.in_flight >= self.config.capacity:  # no await since: exact
            return self._busy(1)
        self.metrics.waiting += 1
        stream = self.generator.generate.remote(Job(clip, opts, rid))
        try:
            header = await stream.__anext__()
        except BackPressureError as exc:
            return self._busy(getattr(exc, "retry_after_s", None) or 1)
        except RayActorError as exc:  # its replica died (Serve starts another) or cannot be reached
            log.warning("request %s: replica lost before its first frame (%s)", rid, type(exc).__name__)
            return _error(503, f"the replica holding this request stopped ({type(exc).__name__}); "
                               f"retry, another replica takes it", **{"Retry-After": "1"})
        except Exception as exc:
            bad = _input_error(exc)
            if bad is not None:
                return _error(400, str(bad))
            log.exception("request %s failed before its first frame", rid)
            return _error(500, f"generation failed ({type(exc).__name__}); see the service log, request {rid}")
        finally:
            self.metrics.waiting -= 1
        self.metrics.in_flight += 1
        return StreamingResponse(self._relay(stream, header, t0, rid), media_type="video/mp4", headers={
            "X-Fpengine-Request-Id": rid, "X-Fpengine-Frames": str(header.frames),
            "X-Fpengine-Height": str(header.height), "X-Fpengine-Width": str(header.width),
            "X-Fpengine-Fps": f"{header.fps:g}", "X-Fpengine-Batch-Size": str(header.batch_size),
            "X-Fpengine-Notes": "; ".join(header.notes).encode("ascii", "replace").decode(),
        })

    def _busy(self, retry_s: float):
        return _error(503, f"the service is busy: every replica is full and its queue ({self.config.max_queue}) "
                           f"too; retry later", **{"Retry-After": str(max(1, round(retry_s)))})

    async def _relay(self, stream, header: Header, t0: float, rid: str):
        first, finished = None, False
        try:
            async for data in stream:
                if first is None:
                    first = time.perf_counter() - t0
                yield data
            finished = True
        except Exception:
            log.exception("request %s failed while streaming", rid)
            self.metrics.stream_errors += 1
            raise
        finally:
            self.metrics.in_flight -= 1
            self.accepted -= 1
            if finished:
                self.metrics.video(time.perf_counter() - t0, first, header.frames, header.batch_size)
            else:
                stream.cancel()


def build_app(config: ServeConfig):
    """The application ``serve.run`` takes: the front end bound to ``config.replicas`` Generators."""
    generator = serve.deployment(Generator).options(
        name=GENERATOR, num_replicas=config.replicas,
        max_ongoing_requests=config.ongoing_per_replica, max_queued_requests=config.capacity,
        ray_actor_options={"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus},
        health_check_period_s=1, health_check_timeout_s=60, graceful_shutdown_timeout_s=5,
    )
    front = serve.deployment(Api).options(
        name=API, num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(64, 4 * config.capacity),
        graceful_shutdown_timeout_s=5,
    )
    return front.bind(generator.bind(config), config)

"""One clip over several processes: one per GPU (NCCL), or CPU processes with gloo where there are
not enough GPUs. ``mode`` says how the clip is split:

``guidance`` (2 ranks): classifier-free guidance's two halves. Every UNet call of the sampler has
the batch [unconditional, conditional]; rank 0 computes the unconditional half, rank 1 the
conditional one (batch 1 each), and one all_gather per step gives both ranks both halves. Both
then apply the same CFG combination and DDIM step to the same numbers, so their latents stay
identical with no further exchange. Everything else is the single-process sampler,
``finephys.sampler.loop.denoise_windows``, unchanged (``GuidanceSplit`` wraps the backend). Rank 0
decodes and writes.

``windows`` (R >= 2 ranks): the context windows of a long clip, dealt out in rounds: in round j
rank r denoises window jR + r, and all ranks step in lockstep. The sampler blends window k's first
frames, after every step i, with window k-1's latents after the same step i; so after each step the
blend runs down a chain: rank r receives window k-1's overlap from rank r-1 (already blended with
k-2 there), blends its own window, and sends its tail on to rank r+1. The last rank of a round
keeps its tail at every step and hands that trajectory to rank 0 when the round ends, for the
first window of the next round. The sampler's loop runs unchanged; ``RankChain`` is the
``WindowChain`` it is given, which deals the windows and carries the overlaps. The UNet calls (nearly all the time) run concurrently; only the
elementwise blend of a few frames is serial. This is the single-process sampler's arithmetic
exactly, reordered, not an approximation of it: results match up to float rounding. Every rank
decodes its own window's finished frames; rank 0 receives them in window order, so frames come
out in order, each exactly once, and a rank holds one window at a time, whatever the clip's length.

``both`` (2R ranks, R >= 2): R guidance pairs (ranks 2w, 2w+1), the windows dealt over the pairs.

Entry points: ``init_distributed`` (torchrun's environment), ``launch`` (spawns local processes),
``generate_parallel`` / ``ParallelGenerationStream``; the CLI's ``--parallel`` route is
``engine.cli.parallel``. NVLink multicast stays off wherever we start NCCL
(``MULTICAST_OFF``): it can take a shared host's GPUs out of service.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing import connection

import numpy as np
import torch
import torch.distributed as dist

from finephys.errors import InputError
from finephys.sampler.loop import WindowChain, context_windows
from finephys.sampler.options import GenerateOptions, plan
from finephys.sampler.poses import prepare_clip, run_pose_stack
from finephys.sampler.stream import Generation, GenerationStream, decode

from engine.host import available_cpus

MODES = ("guidance", "windows", "both")
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
_RUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def wire(x, device) -> torch.Tensor:
    """``x`` (tensor or numpy array) as a contiguous tensor on ``device``, ready for ``dist.send``.

    NCCL sends a tensor's storage as laid out and the receiver's buffer is contiguous, so a permuted
    view would arrive scrambled (torch warns of it on NCCL; the gloo tests do not show it). ``decode``
    returned such a view before it made its frames contiguous.
    """
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    return t.to(device).contiguous()


@dataclass
class DistContext:
    """This process's place in the group: ``device`` is cuda:LOCAL_RANK (NCCL) or the CPU (gloo)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    groups: dict = field(default_factory=dict, repr=False)  # process groups made once, by key


def under_torchrun() -> bool:
    return all(v in os.environ for v in _RUN_VARS)


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(device: str | None, nprocs: int) -> tuple[str, str | None]:
    """('cuda' or 'cpu', a note for the user or None) for ``nprocs`` processes on this machine."""
    device = device or "auto"
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device {device}: with --parallel expected cuda, cpu or auto (process i takes cuda:i)")
    n = _cuda_count()
    if device == "cuda" and n < nprocs:
        raise InputError(f"--device cuda: {nprocs} processes need {nprocs} CUDA devices, this machine has {n}")
    if device == "auto" and n < nprocs:
        note = f"{nprocs} processes, {n} CUDA devices: running on the CPU (gloo)" if n else None
        return "cpu", note
    return ("cuda" if device == "auto" else device), None


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the process group the environment describes (torchrun's RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, or ``launch``'s, which sets the same)."""
    missing = [v for v in _RUN_VARS if v not in os.environ]
    if missing:
        raise InputError(f"init_distributed: {', '.join(missing)} not set (run under torchrun or use launch())")
    os.environ.update(MULTICAST_OFF)
    # NCCL warns (4 lines per run on 2 GPUs) that with eager init (device_id below) the windows split's
    # send/recv are serialised with the group's other ops; each recv waits on its send anyway. Keep
    # the warning off stderr unless the user set the variable.
    os.environ.setdefault("TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING", "false")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    kind, _ = resolve_device(device, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    dev = torch.device("cuda", local) if kind == "cuda" else torch.device("cpu")
    backend = "nccl" if kind == "cuda" else "gloo"
    if kind == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        extra = {"device_id": dev} if kind == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s), **extra)
    return DistContext(rank, world, local, dev, backend)


# --- launching local processes ---------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _environ(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _child(fn, args, rank, world, port, kind, threads, conn):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       **MULTICAST_OFF})
    if threads:
        torch.set_num_threads(threads)

    def on_term(signum, frame):  # exit through Python, so what this process holds is released
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        ctx = init_distributed(kind)
        result = fn(ctx, *args)
        dist.destroy_process_group()
        msg = ("ok", result if rank == 0 else None)
    except InputError as exc:
        msg = ("input", str(exc))
    except (KeyboardInterrupt, SystemExit):
        msg = ("interrupted", None)
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        msg = ("error", traceback.format_exc())
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # on its way out already (SIGKILL follows if stuck)
    try:  # plain pickle: torch's multiprocessing reductions would share memory with a process about to exit
        data = pickle.dumps((rank, *msg))
    except Exception:  # noqa: BLE001
        data = pickle.dumps((rank, "error", "the result does not pickle:\n" + traceback.format_exc()))
    with contextlib.suppress(OSError):
        conn.send_bytes(data)
    conn.close()


def launch(fn, nprocs: int, args: tuple = (), device: str = "auto", threads: int | None = None,
           grace_s: float = 15.0):
    """Run ``fn(ctx, *args)`` in ``nprocs`` new local processes (process i on cuda:i, or all on the
    CPU with gloo; see ``resolve_device``) and return rank 0's result. ``fn`` and ``args`` must
    pickle (``fn`` at module level). When a rank fails the others get SIGTERM (SIGKILL ``grace_s``
    later); then an ``InputError`` is raised here with its message, any other failure as
    RuntimeError with the rank's traceback. On KeyboardInterrupt here (Ctrl-C, or SIGTERM where the
    caller maps it so) rank 0 alone gets SIGTERM, its chance to finish its outputs; the others
    are stopped once it has exited, and its result is returned if it sent one. CPU processes get
    ``threads`` torch threads each (default: this machine's CPUs / nprocs)."""
    import multiprocessing as mp
    import time

    if not isinstance(nprocs, int) or nprocs < 1:
        raise InputError(f"--gpus {nprocs}: expected a positive number of processes")
    kind, _ = resolve_device(device, nprocs)
    threads = threads or (max(1, available_cpus() // nprocs) if kind == "cpu" else None)
    spawn = mp.get_context("spawn")
    port, procs, conns = _free_port(), [], {}
    with _environ(MULTICAST_OFF):
        for rank in range(nprocs):
            recv, send = spawn.Pipe(duplex=False)
            p = spawn.Process(target=_child, args=(fn, args, rank, nprocs, port, kind, threads, send),
                              name=f"fpengine-rank{rank}")
            p.start()
            send.close()
            procs.append(p)
            conns[recv] = rank
    messages, failure, interrupted, kill_at = {}, None, False, None

    def stop(which):
        nonlocal kill_at
        for p in which:
            if p.is_alive():
                p.terminate()
        kill_at = kill_at or time.monotonic() + grace_s

    while conns or any(p.is_alive() for p in procs):
        try:
            waits = list(conns) + [p.sentinel for p in procs if p.is_alive()]
            for ready in connection.wait(waits, timeout=1.0):
                if ready in conns:
                    conns.pop(ready)
                    with contextlib.suppress(EOFError, OSError):
                        rank, status, payload = pickle.loads(ready.recv_bytes())
                        messages[rank] = (status, payload)
                        if status != "ok" and failure is None and not interrupted and kill_at is None:
                            failure = (rank, status, payload)
            reporting = set(conns.values())
            for rank, p in enumerate(procs):
                dead = not p.is_alive() and p.exitcode != 0 and rank not in messages and rank not in reporting
                if dead and failure is None and not interrupted and kill_at is None:
                    failure = (rank, "died", f"exit code {p.exitcode}")
            if failure is not None or (interrupted and not procs[0].is_alive()):
                stop(procs)
            if kill_at is not None and time.monotonic() > kill_at:
                for p in procs:
                    if p.is_alive():
                        p.kill()
        except KeyboardInterrupt:
            interrupted = True
            if procs[0].is_alive():
                procs[0].terminate()
    for p in procs:
        p.join()
    status, payload = messages.get(0, (None, None))
    if interrupted:
        if status == "ok":
            return payload
        raise KeyboardInterrupt
    if failure is not None:
        rank, status, payload = failure
        if status == "input":
            raise InputError(payload)
        if status == "interrupted":
            raise KeyboardInterrupt
        raise RuntimeError(f"rank {rank} of {nprocs} failed: {payload}")
    return payload


# --- the sampler over several ranks ----------------------------------------------------------

def check_guidance_split(mode: str, guidance: float) -> None:
    """A mode that splits the guidance halves needs guidance on (> 1)."""
    if mode in ("guidance", "both") and guidance <= 1.0:
        raise InputError(f"--parallel {mode}: splits classifier-free guidance, which is off at "
                         f"--guidance {guidance:g}; expected --guidance > 1, or --parallel windows")


def split_layout(mode: str, world: int) -> tuple[int, int]:
    """(ranks per guidance batch, ranks the windows are dealt over) for ``mode`` on ``world`` ranks."""
    if mode not in MODES:
        raise InputError(f"--parallel {mode}: expected one of {', '.join(MODES)}")
    if mode == "guidance":
        if world != 2:
            raise InputError(f"--parallel guidance: splits the two guidance halves over exactly 2 processes, "
                             f"got {world} (--parallel both takes 4, 6, ...)")
        return 2, 1
    if mode == "windows":
        if world < 2:
            raise InputError(f"--parallel windows: expected 2 or more processes, got {world}")
        return 1, world
    if world < 4 or world % 2:
        raise InputError(f"--parallel both: expected an even number of processes >= 4, got {world}")
    return 2, world // 2


class GuidanceSplit:
    """A backend whose ``predict_noise`` on the guidance batch [uncond, cond] computes only half
    ``half`` (batch 1) and all_gathers the other from its partner in ``group``; every other call
    of the backend contract is the wrapped backend's."""

    def __init__(self, model, group, half: int):
        self.model, self.group, self.half = model, group, half
        for name in ("name", "config", "device", "pose_device", "dtype", "parts", "precision", "capabilities",
                     "latent_channels", "vae_scale_factor"):
            setattr(self, name, getattr(model, name))
        self.encode_text, self.encode_pose = model.encode_text, model.encode_pose
        self.decode_latents = model.decode_latents

    def predict_noise(self, sample, timestep, text, pose_features):
        if sample.shape[0] != 2:
            raise ValueError(f"guidance split: expected the guidance batch of 2, got {sample.shape[0]}")
        n, h = sample.shape[2], self.half  # text and pose features are (2n, ...): batch-major, frames inside
        mine = self.model.predict_noise(sample[h : h + 1], timestep, text[h * n : (h + 1) * n],
                                        [f[h * n : (h + 1) * n] for f in pose_features]).contiguous()
        both = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(both, mine, group=self.group)
        return torch.cat(both)


class RankChain(WindowChain):
    """The windows dealt over ``peers`` (global ranks; this rank is ``peers[me]``), in lockstep
    rounds: see the module's docstring for the chain that carries the overlaps."""

    def __init__(self, peers: list[int], me: int, device):
        self.peers, self.me, self.device = peers, me, device

    def begin(self, windows, steps) -> None:
        super().begin(windows, steps)
        self._round_traj = None  # the previous round's last window: its tail after every step

    def schedule(self):
        R, K = len(self.peers), len(self.windows)
        for first in range(0, K, R):
            k = first + self.me
            yield k if k < K else None

    def overlap(self, k, i, shape):
        if self.me:
            src = torch.empty(shape, device=self.device)
            dist.recv(src, self.peers[self.me - 1])
            return src
        return self._round_traj[i]

    def tail(self, k, i, latents) -> None:
        self._latent_shape = latents.shape
        active = min(len(self.peers), len(self.windows) - (k - self.me))
        if self.me + 1 < active:
            dist.send(wire(latents, self.device), self.peers[self.me + 1])
        else:
            self._traj.append(latents.clone())

    def window_done(self, k) -> None:
        R, first, windows = len(self.peers), k - self.me, self.windows
        if first + R < len(windows):  # the next round's first window (on peers[0]) blends with this round's last
            if R == 1:
                self._round_traj = self._traj
            elif self.me == R - 1:
                dist.send(wire(torch.stack(self._traj), self.device), self.peers[0])
            elif self.me == 0:
                last = self._traj_shape(windows[first + R - 1][1] - windows[first + R][0])
                self._round_traj = torch.empty((self.steps, *last), device=self.device)
                dist.recv(self._round_traj, self.peers[R - 1])
        self._traj = []

    def _traj_shape(self, overlap: int) -> tuple:
        b, c, _, h, w = self._latent_shape
        return (b, c, overlap, h, w)


def _group(ctx: DistContext, guidance: int):
    """The process group of this rank's guidance pair (every rank makes every pair, in order)."""
    if ctx.world_size == 2:
        return None
    key = ("pairs", guidance)
    if key not in ctx.groups:
        pairs = [dist.new_group([p * guidance + g for g in range(guidance)]) for p in range(ctx.world_size // guidance)]
        ctx.groups[key] = pairs[ctx.rank // guidance]
    return ctx.groups[key]


class ParallelGenerationStream:
    """``GenerationStream`` over the ranks of ``ctx``: every rank makes one with the same model,
    options and ``mode`` and iterates ``chunks()`` (or the stream) to the end; rank 0 gets the
    ``(start, latents, frames)`` chunks in order, the other ranks nothing. Rank 0 prepares the
    clip, checks the options and runs the pose stack, and hands the result to the others (their
    ``clip`` is not read, may be None); bad input raises ``InputError`` on every rank."""

    def __init__(self, model, clip, opts: GenerateOptions, ctx: DistContext, mode: str, progress: bool = True):
        self.model, self.opts, self.ctx, self.mode, self.progress = model, opts, ctx, mode, progress
        self.guidance_ranks, self.window_ranks = split_layout(mode, ctx.world_size)
        payload = [None]
        if ctx.rank == 0:
            try:
                clip, notes = prepare_clip(clip, model)
                p = plan(model, clip, opts)
                check_guidance_split(mode, p.guidance)
                payload = [("ok", p, run_pose_stack(model, clip), notes)]
            except InputError as exc:
                payload = [("error", str(exc))]
        dist.broadcast_object_list(payload, src=0)
        if payload[0][0] == "error":
            raise InputError(payload[0][1])
        _, self.plan, self.stages, self.notes = payload[0]
        self.fps = model.config.fps
        self.window_index, self.half = divmod(ctx.rank, self.guidance_ranks)
        self.local = GenerationStream(model, None, opts, progress and ctx.rank == 0,
                                      prepared=(self.plan, self.stages, self.notes))

    def latent_chunks(self):
        """This rank's finished, undecoded ``(start, stop, latents)`` in frame order: the whole clip
        with guidance alone (every rank), else this rank's windows."""
        G = self.guidance_ranks
        backend = GuidanceSplit(self.model, _group(self.ctx, G), self.half) if G == 2 else None
        chain = None
        if self.window_ranks > 1:
            chain = RankChain([w * G + self.half for w in range(self.window_ranks)], self.window_index, self.ctx.device)
        return self.local.latent_chunks(backend, chain)

    def chunks(self):
        m, rank = self.model, self.ctx.rank
        if self.window_ranks == 1 or self.half:  # rank 0 has the whole clip / the partner of a pair
            for start, _, latents in self.latent_chunks():
                if rank == 0:
                    yield start, latents, decode(m, latents)
            return
        p, G, dev = self.plan, self.guidance_ranks, self.ctx.device
        windows, R = context_windows(p.frames, p.length, p.stride), self.window_ranks
        for j, (start, stop, latents) in enumerate(self.latent_chunks()):
            frames = decode(m, latents)  # every rank decodes its own window
            if rank:
                dist.send(wire(latents, dev), 0)
                dist.send(wire(frames, dev), 0)
                continue
            got = [(start, latents, frames)]
            for member in range(1, min(R, len(windows) - j * R)):
                k = j * R + member
                a, b = windows[k][0], windows[k + 1][0] if k + 1 < len(windows) else windows[k][1]
                lat = torch.empty((1, *latents.shape[1:2], b - a, *latents.shape[3:]), device=dev)
                img = torch.empty((b - a, *frames.shape[1:]), dtype=torch.uint8, device=dev)
                dist.recv(lat, member * G)
                dist.recv(img, member * G)
                got.append((a, lat, img.cpu().numpy()))
            yield from got

    def __iter__(self):
        for _, _, frames in self.chunks():
            yield from frames


def generate_stream_parallel(model, clip, opts: GenerateOptions, ctx: DistContext, mode: str,
                             progress: bool = True) -> ParallelGenerationStream:
    return ParallelGenerationStream(model, clip, opts, ctx, mode, progress)


def generate_parallel(model, clip, opts: GenerateOptions, ctx: DistContext, mode: str,
                      progress: bool = True) -> Generation | None:
    """The whole clip on rank 0 (frames and final latents, as ``generate``); None on the others."""
    stream = generate_stream_parallel(model, clip, opts, ctx, mode, progress)
    chunks = list(stream.chunks())
    return None if ctx.rank else Generation.from_chunks(chunks, stream.stages, stream.notes)

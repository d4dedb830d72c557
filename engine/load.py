"""Loading what a command runs on: the reference model of a checkpoint (or the demo), an engine
directory on a backend, or the pose stack alone; and checking options against a model's config
before any weights load."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from finephys.errors import InputError
from finephys.model.assembly import assemble
from finephys.model.checkpoint import load_checkpoint
from finephys.model.demo import load_demo
from finephys.poses.clip import PoseClip
from finephys.sampler.options import ConfigOnly, GenerateOptions, Plan, check_settings, plan
from finephys.sampler.poses import PoseModel, prepare_clip

BACKENDS = ("reference", "onnxruntime", "tensorrt", "triton")  # all but the first run an engine directory (--engine)


def pick_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device on this machine, expected cpu")
    return device


def load_model(ckpt: Path | None, device: str = "cpu", dtype=torch.float32, engine: Path | None = None,
               backend: str = "reference", require_compiled: bool = False):
    """The reference model of ``ckpt`` (default: the demo model), or with ``engine`` an engine
    directory on ``backend`` (``auto``: the fastest one available, see ``engine.backends``)."""
    if engine is not None:
        if ckpt is not None:
            raise InputError("pass --ckpt or --engine, not both (an engine directory names its checkpoint)")
        from engine.backends import load_backend

        return load_backend(engine, backend, device, require_compiled)
    if require_compiled:
        raise InputError("--require-compiled goes with --engine (an engine directory exported with --compile)")
    if backend not in ("reference", "auto"):
        raise InputError(f"--backend {backend} runs an engine directory: pass --engine DIR (fpengine export writes one)")
    parts = load_demo() if ckpt is None else load_checkpoint(ckpt)
    return assemble(parts, device=pick_device(device), dtype=dtype)


def check_options(clip: PoseClip | None, opts: GenerateOptions, ckpt: Path | None = None,
                  engine: Path | None = None, require_compiled: bool = False, backend: str = "auto") -> Plan | None:
    """``plan``'s checks from the config of ``ckpt`` / ``engine`` / the demo, before loading weights
    (seconds earlier); the stream checks again against the loaded backend. ``require_compiled``:
    also that the engine carries a usable compiled UNet step for every call the plan makes.
    Without a clip (a video whose poses are not detected yet), the checks that need none.
    Returns the plan (None without a clip, or where the engine's manifest is left to the loader)."""
    profile = None
    if engine is not None:
        from export.contract import ShapeProfile
        from export.manifest import engine_config, read_engine_manifest

        try:
            manifest = read_engine_manifest(engine)
            config = engine_config(manifest)
        except InputError:
            return None  # loading the backend reports it, after what it checks first (a GPU for triton)
        profile = ShapeProfile.from_dict(manifest["profile"])
    elif ckpt is not None:
        from finephys.model.checkpoint import read_config

        config = read_config(ckpt)
    else:
        from finephys.model.demo import demo_config

        config = demo_config()
    model = ConfigOnly(config)
    if clip is None:
        check_settings(model, opts)
        return None
    p = plan(model, prepare_clip(clip, model)[0], opts)
    if profile is not None and not _compiles_any_shape(backend, engine):  # what the engine's graphs take
        for name, value in (("height", p.height), ("width", p.width), ("frames", min(p.frames, p.length))):
            profile.check(f"--{name} {value}" if name != "frames" else f"a window of {value} frames", **{name: value})
        if not profile.fits_requests(1, p.cfg_on):
            raise InputError(f"--guidance {p.guidance:g}: guidance runs a UNet batch of 2, outside this engine's "
                             f"profile {profile.batch[0]}..{profile.batch[2]} (re-export with a wider --batch, "
                             "or --guidance 1)")
    if require_compiled and engine is not None:
        from engine.precompile import require_steps

        require_steps(engine, p)
    return p


def _compiles_any_shape(backend: str, engine: Path) -> bool:
    """Whether ``backend`` (``auto``: as it resolves for ``engine`` here) may run sizes outside the
    engine's profile: the triton backend compiles a new shape just in time; ONNX Runtime and
    TensorRT take the profile."""
    if backend == "auto" and torch.cuda.is_available():
        from engine.backends import resolve

        backend = resolve(Path(engine), backend, None)[0]
    return backend == "triton"


def load_pose_model(ckpt: Path | None) -> PoseModel:
    """The pose stack of ``ckpt`` (default: the demo's) on the CPU, without the generator."""
    from finephys.model.checkpoint import load_pose_parts
    from finephys.model.demo import load_demo_pose_parts

    cfg, lifter, physnet = load_demo_pose_parts() if ckpt is None else load_pose_parts(ckpt)
    return PoseModel(cfg, SimpleNamespace(lifter=lifter, physnet=physnet))

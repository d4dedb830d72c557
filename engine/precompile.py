"""Keys and plans of precompiled engines: the machine and software a compiled artefact is valid
for, the UNet calls a generation makes, and ``--require-compiled``'s check. ``fpengine export
--compile`` now builds AOTInductor packages (``engine.aoti``) for every call, DeepCache's
included; engines exported before (sessions 12-14) may carry Dynamo precompiled functions
(``torch.compile(...).aot_compile`` saved with ``save_compiled_function``, the module as their
first argument), which ``CompiledSteps`` and ``StepCall`` still load. Each artefact is keyed by:

    env    GPU architecture (sm_90), torch, triton, CUDA and Python versions
    code   the source of the UNet step (finephys.model.unet, engine.fast_unet, the temporal kernel)
           and the diffusers version: a stand-in for the graph hash, which only a trace gives
    shape  the UNet's batch (2 with guidance), the window's frames, the video height and width
    entry  forward, or DeepCache's forward_and_cache / forward_shallow at a depth

A call whose key does not match runs just in time as before, after one line saying why;
``--require-compiled`` makes that an error. Loading runs code from the engine directory, so
every file is checked against its sha256 in the manifest first.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from finephys.errors import InputError

COMPILED_DIR = "compiled"
TEXT_TOKENS = 77  # the CLIP tokenizer's length: every prompt is padded to it
_SHAPE = re.compile(r"^(?:(\d+)x)?(\d+)x(\d+)x(\d+)$")


@dataclass(frozen=True)
class StepShape:
    """The shape one compiled UNet step serves: sample (batch, C, frames, height/8, width/8)."""

    batch: int
    frames: int
    height: int
    width: int

    @staticmethod
    def parse(text: str) -> "StepShape":
        """``[BATCHx]FRAMESxHEIGHTxWIDTH``; the batch defaults to 2 (guidance on)."""
        m = _SHAPE.match(text.strip().lower())
        if not m:
            raise InputError(f"--compile-shape {text}: expected [BATCHx]FRAMESxHEIGHTxWIDTH, e.g. 16x512x512")
        batch, frames, height, width = (int(v) if v else 2 for v in m.groups())
        if batch < 1 or frames < 1 or height % 8 or width % 8 or height < 8 or width < 8:
            raise InputError(f"--compile-shape {text}: batch and frames must be positive and sizes multiples of 8")
        return StepShape(batch, frames, height, width)

    @staticmethod
    def of_sample(sample: torch.Tensor, factor: int) -> "StepShape":
        """The generation shape of a UNet sample (B,C,F,h,w) whose VAE has scale ``factor``."""
        b, _, f, h, w = sample.shape
        return StepShape(b, f, h * factor, w * factor)

    def __str__(self) -> str:
        return f"{self.batch}x{self.frames}x{self.height}x{self.width}"


def environment() -> dict:
    """What a compiled step is valid for on this machine (no GPU: arch None)."""
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    arch = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = f"sm_{major}{minor}"
    return {"arch": arch, "torch": torch.__version__, "triton": triton, "cuda": torch.version.cuda,
            "python": ".".join(platform.python_version_tuple()[:2])}


# the source the UNet step is traced from (read from disk: nothing is imported, so the packaged
# path can check its key without loading diffusers)
CODE_MODULES = ("finephys.model.unet", "engine.fast_unet", "fpkernels.temporal_attention")


def code_hash() -> str:
    """sha256 over the source the UNet step is traced from, and the diffusers version."""
    import importlib.util

    try:
        version = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        version = "none"
    h = hashlib.sha256(version.encode())
    for name in CODE_MODULES:
        h.update(Path(importlib.util.find_spec(name).origin).read_text(encoding="utf-8").encode())
    return h.hexdigest()


def step_file(entry: str, depth: int | None, shape: StepShape) -> str:
    tag = entry if depth is None else f"{entry}-d{depth}"
    return f"{COMPILED_DIR}/{tag}-{shape}.bin"


def env_mismatch(built: dict, here: dict) -> str | None:
    """None when ``built`` matches ``here``, else which fields differ, in words."""
    diffs = [f"{k} {built.get(k)} (this machine: {here.get(k)})" for k in ("arch", "torch", "triton", "cuda", "python")
             if built.get(k) != here.get(k)]
    return "built for " + ", ".join(diffs) if diffs else None


def sample_inputs(model, shape: StepShape) -> tuple:
    """Inputs of the UNet step at ``shape``, as the sampler passes them (pose features from the
    engine's own encoder, so their shapes and strides are the real ones)."""
    cfg, dev, dt = model.config, model.device, model.dtype
    g = torch.Generator(device="cpu").manual_seed(0)
    n = shape.batch * shape.frames
    f = model.vae_scale_factor
    sample = torch.randn(shape.batch, model.latent_channels, shape.frames, shape.height // f, shape.width // f,
                         generator=g).to(dev, dt)
    text = torch.randn(n, TEXT_TOKENS, cfg.unet["cross_attention_dim"], generator=g).to(dev, dt)
    heatmaps = torch.rand(shape.frames, cfg.encoder.num_joints, shape.height, shape.width, generator=g)
    feats = model.encode_pose(heatmaps)
    feats = [f.repeat(shape.batch, 1, 1, 1) for f in feats]
    return sample, torch.tensor(500, device=dev), text, feats  # int64, as the scheduler's timesteps


class CompiledSteps:
    """The compiled steps an engine directory lists, for this machine (see the module doc)."""

    def __init__(self, engine_dir: Path, info: dict | None, files: dict):
        self.engine_dir, self.files = Path(engine_dir), files
        info = info or {}
        self.steps = {(s["entry"], s["depth"], s["shape"]): s["file"] for s in info.get("steps", [])}
        self.why_not = None  # why none of them can be used here, in words
        if not self.steps:
            self.why_not = "this engine has no compiled steps (fpengine export --compile builds them)"
        else:
            reason = env_mismatch(info.get("env", {}), environment())
            if reason is None and info.get("code") != code_hash():
                reason = "built from another version of the UNet step's code"
            self.why_not = reason

    def usable(self) -> list[tuple[str, int | None, StepShape]]:
        """(entry, depth, shape) of every step this machine can load."""
        return [] if self.why_not else [(e, d, StepShape.parse(s)) for (e, d, s) in sorted(self.steps, key=str)]

    def shapes(self) -> list[str]:
        return sorted({s for (_, _, s) in self.steps})

    def missing(self, entry: str, depth: int | None, shape: StepShape) -> str | None:
        """None when a usable step is there, else why not, in words."""
        if self.why_not:
            return self.why_not
        if (entry, depth, str(shape)) not in self.steps:
            what = entry if depth is None else f"{entry} at DeepCache depth {depth}"
            return (f"no compiled {what} for batch x frames x height x width {shape} "
                    f"(compiled: {', '.join(self.shapes())})")
        return None

    def load(self, entry: str, depth: int | None, shape: StepShape):
        rel = self.steps[(entry, depth, str(shape))]
        path = self.engine_dir / rel
        listed = self.files.get(rel)
        data = path.read_bytes() if path.is_file() else b""
        if listed is None or hashlib.sha256(data).hexdigest() != listed["sha256"]:
            raise InputError(f"{self.engine_dir}: {rel} does not match its sha256 in manifest.json "
                             "(a compiled step runs code: refusing it; re-export with --compile)")
        from engine.fast_unet import load_precompiled

        return load_precompiled(data)


class StepCall:
    """One UNet entry point of the triton backend: the precompiled function for each shape the
    engine covers, else torch.compile just in time (after one line saying why), or an InputError
    with ``require``."""

    def __init__(self, module, entry: str, depth: int | None, compiled: CompiledSteps | None,
                 jit: Callable, require: bool = False, log: Callable[[str], None] = print, *, factor: int):
        self.module, self.entry, self.depth, self.compiled = module, entry, depth, compiled
        self.factor = factor  # the VAE's scale factor: latent sample size -> video size
        self.jit_factory, self.require, self.log = jit, require, log
        self.fns: dict = {}
        self._jit = None
        self.compiled_calls = 0  # shapes served by a precompiled step (tests count them)

    def _resolve(self, shape: StepShape, args: tuple):
        why = self.compiled.missing(self.entry, self.depth, shape) if self.compiled else "no engine directory"
        if why is None:
            fn = self.compiled.load(self.entry, self.depth, shape)
            kwargs = {} if self.depth is None else {"depth": self.depth}
            check = getattr(fn, "guard_check", None)  # absent in torch versions without guard checks
            if check is None or check(self.module, *args, **kwargs):
                self.compiled_calls += 1
                return functools.partial(fn, self.module, **kwargs)
            why = f"the compiled {self.entry} at {shape} does not accept these inputs (dtypes or strides differ)"
        if self.require:
            raise InputError(f"--require-compiled: {why}")
        if self.compiled is not None:
            self.log(f"compiled steps: {why}; compiling just in time (about 100 s at 512x512)")
        if self._jit is None:
            self._jit = self.jit_factory()
        return self._jit

    def __call__(self, sample, *rest):
        shape = StepShape.of_sample(sample, self.factor)
        fn = self.fns.get(shape)
        if fn is None:
            fn = self.fns[shape] = self._resolve(shape, (sample, *rest))
        return fn(sample, *rest)  # the depth is bound in both kinds


def planned_steps(plan) -> list[tuple[str, int | None, StepShape]]:
    """The UNet calls a generation ``plan`` (one request) makes: (entry, depth, shape)."""
    shape = StepShape(2 if plan.cfg_on else 1, min(plan.frames, plan.length), plan.height, plan.width)
    interval, depth = plan.deep_cache
    if interval <= 1:
        return [("forward", None, shape)]
    return [("forward_and_cache", depth, shape), ("forward_shallow", depth, shape)]


def require_steps(engine_dir: Path, plan) -> None:
    """InputError (before any weights load) unless the engine carries a usable compiled step for
    every UNet call of ``plan`` on this machine."""
    from engine.aoti import cache_component, step_key
    from export.manifest import engine_config, read_engine_manifest

    manifest = read_engine_manifest(Path(engine_dir))
    info = manifest.get("compiled") or {}
    compiled = CompiledSteps(engine_dir, info, manifest["files"])
    cfg = engine_config(manifest)
    channels = int(cfg.unet.get("in_channels", 4))
    packaged = set() if env_mismatch(info.get("env", {}), environment()) else \
        {(p["component"], p["key"]) for p in info.get("packages", [])}
    for entry, depth, shape in planned_steps(plan):
        component = "unet" if entry == "forward" else cache_component(entry, depth)
        if (component, step_key(channels, shape.batch, shape.frames, shape.height, shape.width,
                                  cfg.vae_scale_factor)) in packaged:
            continue  # an AOTInductor package (engine.aoti) serves it
        why = compiled.missing(entry, depth, shape)
        if why:
            raise InputError(f"--require-compiled: {why}")

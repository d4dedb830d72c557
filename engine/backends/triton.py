"""The `triton` backend: an engine directory's fp16 weights (LoRA merged) in PyTorch on CUDA,
the UNet through ``engine.fast_unet`` (fused QKV, channels-last, torch.compile, one CUDA graph
per shape), the project's Triton kernels for PhysNet and the heatmaps. Text embeddings and pose
features are computed once per clip (per window) by the sampler; nothing in the denoising loop
reads device memory back."""
from __future__ import annotations

import functools
import hashlib
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from finephys.model.encoder import HeatmapEncoder
from finephys.errors import InputError
from finephys.model.backend import BackendBase, Capabilities
from finephys.model.build import build_text_encoder, build_unet, build_vae
from finephys.model.unet import PoseGuidedUNet
from finephys.model.weights import build_loaded

from engine.aoti import WEIGHTS
from engine.cuda_graph import CudaGraphCall
from engine.fast_unet import compile_call, prepare_unet
from engine.precompile import (
    CompiledSteps, StepCall, StepShape, code_hash, environment, sample_inputs,
)
from engine.backends.base import EngineFiles, load_pose_parts

FILES = {"unet": WEIGHTS["unet"], "vae": WEIGHTS["vae_decoder"], "text_encoder": WEIGHTS["text_encoder"],
         "encoder": WEIGHTS["heatmap_encoder"]}


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _require_cuda(device) -> None:
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        raise InputError("--backend triton needs a CUDA GPU (use onnxruntime or reference on the CPU)")


class TritonModel(BackendBase):
    """The backend object: the sampler's four calls plus the pose stack (see FinePhysModel)."""

    name = "triton"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(kernels=True, async_decode=self.async_decode, deep_cache=self.unet.cache_depths())

    def __init__(self, config, parts, modules: dict, device="cuda", dtype=torch.float16,
                 compile_mode: str | None = "default", cuda_graphs: bool = True,
                 compiled: CompiledSteps | None = None, require_compiled: bool = False, log=None):
        _require_cuda(device)
        self.config, self.parts, self.device, self.dtype = config, parts, torch.device(device), dtype
        self.modules = {k: m.to(self.device, dtype).eval().requires_grad_(False) for k, m in modules.items()}
        self.unet = prepare_unet(PoseGuidedUNet(self.modules["unet"]))
        self._compile_mode, self._cuda_graphs = compile_mode, cuda_graphs
        self.compiled, self._require, self._log = compiled, require_compiled, log or _stderr
        self._calls = {}
        self.async_decode = True  # the VAE decodes on a side stream (benchmarks turn it off to compare)
        self.modules["vae"].to(memory_format=torch.channels_last)

    def _call(self, name: str, depth: int | None = None):
        """The compiled (and graph-captured) UNet entry point ``name`` (with ``depth`` bound); made
        on first use, so DeepCache's two extra graphs cost nothing unless asked for. Shapes the
        engine directory carries precompiled steps for load them; others compile just in time."""
        key = (name, depth)
        if key not in self._calls:
            fn = getattr(self.unet, name)
            if depth is not None:
                fn = functools.partial(fn, depth=depth)
            if self._compile_mode is None:
                fast = fn
            else:
                fast = StepCall(self.unet, name, depth, self.compiled, lambda: compile_call(fn, self._compile_mode),
                                self._require, self._log, factor=self.vae_scale_factor)
            self._calls[key] = CudaGraphCall(fast) if self._cuda_graphs else fast
        return self._calls[key]

    def warm_up(self) -> None:
        """Load every precompiled step this machine can use and capture its CUDA graph."""
        if self.compiled is None or self.compiled.why_not or self._compile_mode is None:
            return
        for entry, depth, shape in self.compiled.usable():
            args = sample_inputs(self, shape)
            if entry == "forward_shallow":
                with torch.no_grad():
                    args = (*args, self.unet.forward_and_cache(*args, depth=depth)[1])
            with torch.no_grad():
                self._call(entry, depth)(*args)
        torch.cuda.synchronize(self.device)

    def compiled_shapes(self) -> list[str]:
        return [] if self.compiled is None or self.compiled.why_not else self.compiled.shapes()

    def compiled_steps_used(self) -> int:
        """How many (entry, shape) UNet steps ran from the engine's precompiled steps so far."""
        steps = [c.fn if isinstance(c, CudaGraphCall) else c for c in self._calls.values()]
        return sum(s.compiled_calls for s in steps if isinstance(s, StepCall))

    def _encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.modules["text_encoder"](ids)[0]

    @torch.no_grad()
    def encode_pose(self, heatmaps: torch.Tensor) -> list[torch.Tensor]:
        return self.modules["encoder"](heatmaps.to(self.device, self.dtype))

    @torch.no_grad()
    def predict_noise(self, sample, timestep, text, pose_features) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=self.device).reshape(())
        return self._call("forward")(sample.to(self.dtype), t, text, list(pose_features))

    @torch.no_grad()
    def predict_noise_cached(self, sample, timestep, text, pose_features, depth):
        t = torch.as_tensor(timestep, device=self.device).reshape(())
        return self._call("forward_and_cache", depth)(sample.to(self.dtype), t, text, list(pose_features))

    @torch.no_grad()
    def predict_noise_shallow(self, sample, timestep, text, pose_features, deep, depth):
        t = torch.as_tensor(timestep, device=self.device).reshape(())
        return self._call("forward_shallow", depth)(sample.to(self.dtype), t, text, list(pose_features), deep)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.modules["vae"]
        z = latents.to(self.device, self.dtype) / vae.config.scaling_factor
        return vae.decode(z.contiguous(memory_format=torch.channels_last)).sample


def triton_from_parts(parts, device="cuda", **kw) -> TritonModel:
    """From checkpoint parts (LoRA merged into the weights first): benchmarks and tests."""
    from export.merge import merge_lora
    from finephys.model.assembly import assemble

    merge_lora(assemble(parts, device=device))
    modules = {"unet": parts.unet, "vae": parts.vae, "text_encoder": parts.text_encoder, "encoder": parts.encoder}
    return TritonModel(parts.config, parts, modules, device, **kw)


def load_triton_backend(engine_dir: Path, device: str = "cuda", **kw) -> TritonModel:
    """From an engine directory written by ``fpengine export`` (its precision, LoRA merged)."""
    _require_cuda(device)  # before any weights are read
    base = EngineFiles(engine_dir)  # manifest, file hashes, config, precision, profile
    cfg = base.config
    compiled = CompiledSteps(base.engine_dir, base.manifest.get("compiled"), base.manifest["files"])
    if kw.get("require_compiled") and compiled.why_not:
        raise InputError(f"--require-compiled: {compiled.why_not}")
    builders = {"unet": build_unet, "vae": build_vae, "text_encoder": build_text_encoder,
                "encoder": lambda c: HeatmapEncoder(c.encoder)}
    # built with parameters on meta and the engine's weights assigned: no random initialisation
    modules = {name: build_loaded(lambda: build(cfg), base.engine_dir / FILES[name]).to(base.dtype)
               for name, build in builders.items()}
    parts = load_pose_parts(base.engine_dir, cfg, device)
    model = TritonModel(cfg, parts, modules, device, base.dtype, compiled=compiled, **kw)
    model.profile = base.profile  # `fpengine check` picks its default sizes from it
    return model


class CompileSpec:
    """``fpengine export --compile``: the UNet steps to precompile into the engine directory
    (``export.build`` runs it as its compiled stage; see ``engine.precompile``)."""

    def __init__(self, shapes: list[StepShape], depths: list[int] = ()):
        if not torch.cuda.is_available():
            raise InputError("--compile needs a CUDA GPU: the compiled steps are built for the GPU they run on")
        self.shapes, self.depths = list(shapes), sorted(set(depths))

    def key_inputs(self) -> dict:
        import inspect

        import engine.aoti

        return {"env": environment(), "code": code_hash(), "shapes": [str(s) for s in self.shapes],
                "depths": self.depths, "packages": hashlib.sha256(inspect.getsource(engine.aoti).encode()).hexdigest()}

    def run(self, engine_dir: Path, log) -> dict:
        """The AOTInductor packages of all four components (``engine.aoti``), the plain UNet step
        and DeepCache's two UNet calls at each depth among them."""
        from engine.aoti import build_packages
        from engine.fast_unet import use_temporal_kernel

        model = load_triton_backend(engine_dir, "cuda", cuda_graphs=False)
        use_temporal_kernel(model.modules["unet"], "aot")  # the kernel compiled into the package
        parts = SimpleNamespace(unet=model.modules["unet"], vae=model.modules["vae"],
                                text_encoder=model.modules["text_encoder"], encoder=model.modules["encoder"])
        shapes = [(s.batch, s.frames, s.height, s.width) for s in self.shapes]
        packages = build_packages(parts, model.config, model.precision.value, shapes, Path(engine_dir), log,
                                  depths=self.depths)
        return {**self.key_inputs(), "steps": [], "packages": packages}

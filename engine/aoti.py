"""AOTInductor packages of the triton backend's four components (issue 19): ``fpengine export
--compile`` builds them once per shape, ``generate`` loads them in a new process that imports
neither diffusers nor transformers and never compiles.

A package holds the compiled graph of one component at one input shape (the export contract's
graph: ``export.onnx_export.graph_module``), with the UNet prepared as the triton backend runs it
(fused QKV, channels-last, the temporal-attention kernel as a ``triton_op`` that Inductor compiles
into the package). The weights stay out of the package (``package_constants_in_so=False``): the
loader feeds it the engine's own safetensors by name, deriving what the preparation changed:

    to_qkv / to_kv   the concatenation of to_q, to_k, to_v (fused projections)
    4-D weights      channels-last, in the UNet and the VAE decoder (as the package was traced)
    buffers          the few not in the weights (CLIP's position_ids): COMPONENT-buffers.safetensors

The export checks that this derivation gives every constant the package wants, bit for bit and
with its strides, and runs each package against the eager module once.

DeepCache's two UNet calls at a depth are packages of their own, fed the UNet's weights:
``unet_cache_dN`` (the full step, returning the deep features too) and ``unet_shallow_dN`` (the
partial step, the deep features as its fourth input, before the pose features).

Packages are loaded through ``torch._C._aoti.AOTIModelPackageLoader`` directly:
``torch._inductor.aoti_load_package`` imports Dynamo and Inductor and builds test programs for
every CPU instruction set (47 s on the lent H200) only to compare them with the package's
metadata. ``run_single_threaded`` lets a CUDA graph capture the call.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import torch

PACKAGE_DIR = "compiled"
COMPONENTS = ("text_encoder", "heatmap_encoder", "unet", "vae_decoder")
WEIGHTS = {  # the engine directory's weight file of each component
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae_decoder": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "heatmap_encoder": "pose/heatmap_encoder.safetensors",
}
PREFIX = {"unet": "unet.unet.", "vae_decoder": "vae.", "text_encoder": "text_encoder.", "heatmap_encoder": "encoder."}
CHANNELS_LAST = ("unet", "vae_decoder")
_FUSED = re.compile(r"^(.*)\.to_(qkv|kv)\.(weight|bias)$")
_CACHE = re.compile(r"^unet_(cache|shallow)_d(\d+)$")


def cache_component(entry: str, depth: int) -> str:
    """The package component of DeepCache's ``forward_and_cache`` / ``forward_shallow`` at ``depth``."""
    return f"unet_{'cache' if entry == 'forward_and_cache' else 'shallow'}_d{depth}"


def cache_depth(component: str) -> int | None:
    """The DeepCache depth of a ``cache_component``; None for the four components."""
    m = _CACHE.match(component)
    return int(m[2]) if m else None


def base_component(component: str) -> str:
    """The component whose weights a package is fed: the UNet for DeepCache's packages."""
    return "unet" if cache_depth(component) is not None else component


class UNetCacheGraph(torch.nn.Module):
    """DeepCache's full step at ``depth``: (noise, the deep features its shallow steps reuse)."""

    def __init__(self, unet, depth: int):
        from finephys.model.unet import PoseGuidedUNet

        super().__init__()
        self.unet, self.depth = PoseGuidedUNet(unet), depth

    def forward(self, sample, timestep, encoder_hidden_states, *pose_features):
        return self.unet.forward_and_cache(sample, timestep, encoder_hidden_states, list(pose_features), self.depth)


class UNetShallowGraph(UNetCacheGraph):
    """DeepCache's shallow step at ``depth`` on the deep features of the last full step."""

    def forward(self, sample, timestep, encoder_hidden_states, deep, *pose_features):
        return self.unet.forward_shallow(sample, timestep, encoder_hidden_states, list(pose_features), deep,
                                         self.depth)


def shape_key(t) -> str:
    """A package's key: its first input's shape (the tensor, or its shape), e.g. ``2x4x16x64x64``
    for a UNet step."""
    return "x".join(str(int(d)) for d in getattr(t, "shape", t))


def step_key(channels: int, batch: int, frames: int, height: int, width: int, factor: int) -> str:
    """The UNet package's key for a generation shape (its sample: batch, channels, frames, latents;
    ``factor``: the VAE's scale factor)."""
    return f"{batch}x{channels}x{frames}x{height // factor}x{width // factor}"


def package_file(component: str, key: str) -> str:
    return f"{PACKAGE_DIR}/{component}-{key}.pt2"


def buffers_file(component: str) -> str:
    return f"{PACKAGE_DIR}/{component}-buffers.safetensors"


def package_dims(cfg, batch: int, frames: int, height: int, width: int) -> list[tuple[str, dict]]:
    """(component, contract dims) of every package one generation shape needs: the UNet step,
    the heatmap encoder over the window, the text encoder for ``batch`` prompts, and the VAE
    decoder for each chunk size the sampler decodes (8 frames, and the remainder)."""
    from export.contract import VAE_CHUNK, resolve_dims

    dims = lambda **kw: resolve_dims(cfg, **{"batch": batch, "frames": frames, "height": height,  # noqa: E731
                                             "width": width, "prompts": batch, **kw})
    out = [("text_encoder", dims()), ("heatmap_encoder", dims()), ("unet", dims())]
    for chunk in sorted({min(VAE_CHUNK, frames), frames % VAE_CHUNK} - {0}):
        out.append(("vae_decoder", dims(decode_batch=chunk)))
    return out


def derive_constants(component: str, fqns: list[str], weights: dict, buffers: dict) -> dict:
    """{fqn: tensor} for a package from the engine's weights of ``component`` (see the module doc)."""
    component = base_component(component)
    prefix, out = PREFIX[component], {}
    for fqn in fqns:
        if not fqn.startswith(prefix):
            raise KeyError(f"{component}: the package wants {fqn}, outside {prefix}*")
        name = fqn[len(prefix):]
        if name in weights:
            t = weights[name]
        elif name in buffers:
            t = buffers[name]
        else:
            m = _FUSED.match(name)
            if m is None:
                raise KeyError(f"{component}: the package wants {fqn}, which the engine's weights lack")
            t = torch.cat([weights[f"{m[1]}.to_{p}.{m[3]}"] for p in m[2]], dim=0)
        if component in CHANNELS_LAST and t.dim() == 4:
            t = t.to(memory_format=torch.channels_last)  # as Module.to gives it (also for 1x1 kernels)
        out[fqn] = t
    return out


class PackageRunner:
    """One package, loaded for ``device`` and fed ``constants`` (kept alive here: the package
    holds their pointers). Called with the contract's input tensors; returns its outputs."""

    def __init__(self, path: Path, device: torch.device, constants_for):
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
        else:
            index = -1
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", True, 1, index)
        self.constants = constants_for(self.loader.get_constant_fqns())
        self.loader.load_constants(self.constants, False, True, True)  # not inactive, full update, user managed

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return self.loader.run(list(tensors))


def _module_tensors(module) -> dict:
    return {**dict(module.named_buffers()), **dict(module.named_parameters())}


def build_packages(parts, cfg, precision: str, shapes, out_dir: Path, log=print, depths=()) -> list[dict]:
    """Compile every component of ``parts`` (prepared as the triton backend runs them, on their
    device) for each (batch, frames, height, width) in ``shapes`` into ``out_dir/compiled``, and
    DeepCache's two UNet calls at each of ``depths``; check each package against the eager module;
    return the manifest entries."""
    from safetensors.torch import load_file, save_file

    from export.contract import contracts
    from export.onnx_export import graph_module

    from engine.aoti_toolchain import package_compiler

    cons, out_dir, entries = contracts(cfg), Path(out_dir), []
    (out_dir / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    cxx = package_compiler(next(parts.unet.parameters()).device.type, log)
    for component in COMPONENTS:
        module = graph_module(parts, component)
        device = next(module.parameters()).device
        buffers = {k[len(PREFIX[component]):]: v.detach().contiguous() for k, v in module.named_buffers()
                   if k not in module.state_dict()}
        if buffers:
            save_file(buffers, str(out_dir / buffers_file(component)))
        weights = load_file(str(out_dir / WEIGHTS[component]), device=str(device))
        cached = [(UNetCacheGraph(parts.unet, d).eval(), UNetShallowGraph(parts.unet, d).eval()) for d in depths] \
            if component == "unet" else []
        keys = set()
        for shape in shapes:
            for comp, dims in package_dims(cfg, *shape):
                if comp != component:
                    continue
                inputs = tuple(t.to(device) for t in cons[component].sample_inputs(dims, precision))
                key = shape_key(inputs[0])
                if key in keys:
                    continue
                keys.add(key)
                entries.append(_package(out_dir, component, key, module, inputs, weights, buffers, log, cxx))
                for (full, shallow), depth in zip(cached, depths):
                    with torch.no_grad():
                        deep = full(*inputs)[1].contiguous()
                    entries.append(_package(out_dir, cache_component("forward_and_cache", depth), key, full, inputs,
                                            weights, buffers, log, cxx))
                    entries.append(_package(out_dir, cache_component("forward_shallow", depth), key, shallow,
                                            (*inputs[:3], deep, *inputs[3:]), weights, buffers, log, cxx))
        del weights
    return entries


def _package(out_dir: Path, component: str, key: str, module, inputs, weights, buffers, log, cxx: str) -> dict:
    """One package: ``module`` exported at ``inputs``, compiled (linked by ``cxx``, the compiler
    ``engine.aoti_toolchain`` chose), checked; its manifest entry."""
    rel = package_file(component, key)
    log(f"compile: {component} at {key} (AOTInductor) ...")
    t0 = time.perf_counter()
    from engine.aoti_toolchain import host_isa_configs

    configs = {"aot_inductor.package_constants_in_so": False, "cpp.cxx": (None, cxx),
               **host_isa_configs(inputs[0].device.type)}
    with torch.no_grad():
        exported = torch.export.export(module, inputs, strict=False)
        torch._inductor.aoti_compile_and_package(exported, package_path=str(out_dir / rel), inductor_configs=configs)
        t1 = time.perf_counter()
        err = _check_package(out_dir / rel, component, module, _module_tensors(module), weights, buffers, inputs)
    log(f"compiled {component} at {key} in {t1 - t0:.1f} s; checked in {time.perf_counter() - t1:.1f} s "
        f"(largest difference from the eager module {err:.2g})")
    entry = {"component": component, "key": key, "file": rel}
    if buffers:
        entry["buffers"] = buffers_file(base_component(component))
    return entry


def _check_package(path: Path, component: str, module, tensors: dict, weights: dict, buffers: dict, inputs) -> float:
    """The loader's constants equal the module's (values and strides), and the package's outputs
    match the eager module's; else an error before the engine is written."""
    def constants_for(fqns):
        derived = derive_constants(component, fqns, weights, buffers)
        for fqn, t in derived.items():
            ref = tensors.get(fqn)
            if ref is None or t.stride() != ref.stride() or not torch.equal(t, ref):
                raise RuntimeError(f"{component}: the constant {fqn} derived from the engine's weights differs "
                                   "from the compiled module's (values or strides)")
        return derived

    runner = PackageRunner(path, inputs[0].device, constants_for)
    got = runner(*inputs)
    want = module(*inputs)
    want = list(want) if isinstance(want, (list, tuple)) else [want]
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        err = float((g.float() - w.float()).abs().max())
        scale = max(float(w.float().abs().max()), 1.0)
        if not err <= 2e-2 * scale:
            raise RuntimeError(f"{component}: the compiled package differs from the eager module by {err:.3g} "
                               f"(outputs up to {scale:.3g})")
        worst = max(worst, err)
    return worst

"""The triton backend from precompiled packages (``engine.aoti``): an engine directory exported
with ``--compile`` runs its four components from AOTInductor packages, the UNet step replayed as
a CUDA graph, without importing diffusers or transformers and without compiling anything.

A call whose shape the engine has no package for (or a DeepCache step) goes to the just-in-time
triton backend, built on first need, after one line saying why; ``--require-compiled`` makes that
an error instead.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from finephys.errors import InputError
from finephys.model.backend import Capabilities
from finephys.model.unet import cache_depths_of

from engine.aoti import (
    COMPONENTS, WEIGHTS, PackageRunner, base_component, cache_component, cache_depth, derive_constants, package_dims,
    shape_key,
)
from engine.backends.base import GraphBackend
from engine.precompile import code_hash, env_mismatch, environment


def usable_packages(info: dict | None) -> tuple[list[dict], str | None]:
    """(packages this machine can load, None) or ([], why not in words) from the manifest's
    ``compiled`` entry."""
    packages = (info or {}).get("packages") or []
    if not packages:
        return [], "this engine has no compiled packages (fpengine export --compile builds them)"
    why = env_mismatch((info or {}).get("env", {}), environment())
    return ([], why) if why else (packages, None)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def load_packaged(engine_dir: Path, device, require_compiled: bool = False, log=None, **kw):
    """The packaged triton backend where the engine carries packages this machine can load; else
    None (after one line saying why, when it carries packages built elsewhere)."""
    from export.manifest import read_engine_manifest

    info = read_engine_manifest(Path(engine_dir)).get("compiled")
    packages, why = usable_packages(info)
    if not packages:
        if (info or {}).get("packages"):
            (log or _stderr)(f"compiled packages: {why}; using the compiled steps or compiling just in time")
        return None
    if info.get("code") not in (None, code_hash()):
        (log or _stderr)("compiled packages: built from another version of the UNet step's code or of diffusers "
                         "(before 283252d, a temporal-attention kernel 4-7x slower); fpengine export --compile "
                         "rebuilds them")
    return PackagedTritonModel(engine_dir, device, packages, require_compiled, log=log, **kw)


class PackagedTritonModel(GraphBackend):
    name = "triton"

    def __init__(self, engine_dir: Path, device, packages: list[dict], require_compiled: bool = False,
                 cuda_graphs: bool = True, log=None, prefetch: bool = True, **jit_kw):
        self._reader = None  # the packaged components' weights, read in the background from here on
        if prefetch:
            from engine.device_weights import DeviceWeights

            bases = {base_component(p["component"]) for p in packages}
            self._reader = DeviceWeights([Path(engine_dir) / WEIGHTS[c] for c in COMPONENTS if c in bases],
                                         torch.device(device))
        try:
            super().__init__(engine_dir, device)
        except BaseException:
            if self._reader is not None:
                self._reader.close()
            raise
        self.packages = {(p["component"], p["key"]): p for p in packages}
        self._require, self._graphs, self._log, self._jit_kw = require_compiled, cuda_graphs, log or _stderr, jit_kw
        self._weights, self._buffers, self._runners, self._jit, self._said = {}, {}, {}, None, set()
        self._derived = {}  # component -> {fqn: the constant fed to its packages}
        self.package_calls = 0  # UNet shapes served by a package (tests count them)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(deep_cache=cache_depths_of(dict(self.config.unet)))

    @property
    def pose_device(self) -> torch.device:
        """The CPU: a clip's pose stack is a few hundred small operations, 0.2 s on an H100 host's
        CPU in a new process against 0.46 s on its GPU (kernels loaded on first use), on the
        start-up's critical path; later clips 7 ms on two cores. The heatmaps are still drawn on
        the model's device."""
        return torch.device("cpu")

    # -- packages ---------------------------------------------------------------------------
    def _constants(self, component: str, fqns: list[str]) -> dict:
        from safetensors.torch import load_file

        component = base_component(component)  # DeepCache's packages share the UNet's weights
        if component not in self._weights:
            path = self.engine_dir / WEIGHTS[component]
            self._weights[component] = self._reader.get(path) if self._reader is not None and path in self._reader \
                else load_file(str(path), device=str(self.device))
        derived = self._derived.setdefault(component, {})  # one fused or channels-last copy for all its packages
        missing = [f for f in fqns if f not in derived]
        derived.update(derive_constants(component, missing, self._weights[component], self._buffers.get(component, {})))
        return {f: derived[f] for f in fqns}

    def _runner(self, component: str, first: torch.Tensor):
        """The loaded package for ``component`` at ``first``'s shape, or None where there is none."""
        key = (component, shape_key(first))
        if key in self._runners:
            return self._runners[key]
        entry = self.packages.get(key)
        if entry is None:
            return None
        for rel in (entry["file"], entry.get("buffers")):
            if rel and hashlib.sha256((self.engine_dir / rel).read_bytes()).hexdigest() != \
                    self.manifest["files"].get(rel, {}).get("sha256"):
                raise InputError(f"{self.engine_dir}: {rel} does not match its sha256 in manifest.json "
                                 "(a compiled package runs code: refusing it; re-export with --compile)")
        base = base_component(component)
        if entry.get("buffers") and base not in self._buffers:
            from safetensors.torch import load_file

            self._buffers[base] = load_file(str(self.engine_dir / entry["buffers"]), device=str(self.device))
        runner = PackageRunner(self.engine_dir / entry["file"], self.device,
                               lambda fqns: self._constants(component, fqns))
        if base == "unet":
            self.package_calls += 1
            if self._graphs and self.device.type == "cuda":
                from engine.cuda_graph import CudaGraphCall

                if self._reader is not None:  # its thread's CUDA calls must not meet the graph's capture
                    self._reader.wait()
                runner = CudaGraphCall(runner, warmup=1)  # a package is compiled: one call sets up its handles
        self._runners[key] = runner
        return runner

    def _run(self, component: str, feeds: dict) -> list[torch.Tensor]:
        tensors = [t.to(self.device) for t in feeds.values()]
        return list(self._runner(component, tensors[0])(*tensors))

    def _fallback(self, component: str, first: torch.Tensor, what: str | None = None):
        """The just-in-time triton backend, for a call no package covers (after one line)."""
        why = what or (f"no compiled {component} package for shape {shape_key(first)} (packaged: "
                       + ", ".join(sorted(k for c, k in self.packages if c == component)) + ")")
        if self._require:
            raise InputError(f"--require-compiled: {why}")
        if why not in self._said:
            self._said.add(why)
            self._log(f"compiled packages: {why}; compiling just in time")
        if self._jit is None:
            from engine.backends.triton import load_triton_backend

            base = base_component(component)
            if self._reader is not None and base not in self._weights:  # the just-in-time backend loads its own
                self._reader.drop(self.engine_dir / WEIGHTS[base])  # (a package of it, later, reads them again)
            self._jit = load_triton_backend(self.engine_dir, str(self.device), **self._jit_kw)
        return self._jit

    def _has(self, component: str, first: torch.Tensor) -> bool:
        return (component, shape_key(first)) in self.packages

    # -- the sampler's calls ------------------------------------------------------------------
    def _encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if self._has("text_encoder", ids):
            return super()._encode_ids(ids)
        return self._fallback("text_encoder", ids)._encode_ids(ids)

    @torch.no_grad()
    def encode_pose(self, heatmaps: torch.Tensor) -> list[torch.Tensor]:
        if self._has("heatmap_encoder", heatmaps):
            return super().encode_pose(heatmaps)
        return self._fallback("heatmap_encoder", heatmaps).encode_pose(heatmaps)

    @torch.no_grad()
    def predict_noise(self, sample, timestep, text, pose_features) -> torch.Tensor:
        if self._has("unet", sample):
            return super().predict_noise(sample, timestep, text, pose_features)
        return self._fallback("unet", sample).predict_noise(sample, timestep, text, pose_features)

    @torch.no_grad()
    def predict_noise_cached(self, sample, timestep, text, pose_features, depth):
        component = cache_component("forward_and_cache", depth)
        if not self._has(component, sample):
            jit = self._fallback("unet", sample, f"no compiled DeepCache package at depth {depth} for shape "
                                                 f"{shape_key(sample)}")
            return jit.predict_noise_cached(sample, timestep, text, pose_features, depth)
        inputs = self._typed("unet", *self._step_inputs(sample, timestep, text, pose_features))
        return tuple(self._runner(component, sample)(*inputs))  # (noise, deep)

    @torch.no_grad()
    def predict_noise_shallow(self, sample, timestep, text, pose_features, deep, depth):
        component = cache_component("forward_shallow", depth)
        if not self._has(component, sample):
            jit = self._fallback("unet", sample, f"no compiled DeepCache package at depth {depth} for shape "
                                                 f"{shape_key(sample)}")
            return jit.predict_noise_shallow(sample, timestep, text, pose_features, deep, depth)
        inputs = self._typed("unet", *self._step_inputs(sample, timestep, text, pose_features))
        inputs.insert(3, deep.to(inputs[0].dtype).contiguous())
        return self._runner(component, sample)(*inputs)[0]

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self._has("vae_decoder", latents):
            return super().decode_latents(latents)
        size = self._decode_size(latents)
        if size is not None:  # the VAE decodes each frame on its own: pad to a packaged chunk, drop the extra
            n = latents.shape[0]
            padded = torch.cat([latents, latents[-1:].expand(size - n, *latents.shape[1:])])
            return super().decode_latents(padded)[:n]
        return self._fallback("vae_decoder", latents).decode_latents(latents)

    def _decode_size(self, latents: torch.Tensor) -> int | None:
        """The smallest packaged decoder chunk above ``latents``' frames at their latent size (a
        window's finished frames, e.g. 12 = 8 + 4 of a 16-frame engine whose decoder was built for
        8), or None."""
        rest = shape_key(latents.shape[1:])
        sizes = [int(k.split("x", 1)[0]) for c, k in self.packages if c == "vae_decoder" and k.split("x", 1)[1] == rest]
        return min((s for s in sizes if s > latents.shape[0]), default=None)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        if self._jit is not None:
            self._jit.close()

    # -- what the commands ask ----------------------------------------------------------------
    def warm_up(self) -> None:
        """Load every package of each packaged generation shape and run it once (the UNet's CUDA
        graph captured; DeepCache's too at every packaged depth), so that the first request of that
        shape is as fast as later ones."""
        depths = sorted({cache_depth(c) for c, _ in self.packages} - {None})
        for shape in self.compiled_shapes():
            for component, dims in package_dims(self.config, *(int(v) for v in shape.split("x"))):
                inputs = self.contracts[component].sample_inputs(dims, self.precision)
                if not self._has(component, inputs[0]):
                    continue
                with torch.no_grad():
                    self._call(component, *inputs)
                if component != "unet":
                    continue
                sample, t, text, *feats = inputs
                for depth in depths:
                    if self._has(cache_component("forward_and_cache", depth), sample):
                        _, deep = self.predict_noise_cached(sample, t, text, feats, depth)
                        self.predict_noise_shallow(sample, t, text, feats, deep, depth)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def compiled_shapes(self) -> list[str]:
        """``BxFxHxW`` of the packaged UNet steps."""
        out = []
        for component, key in self.packages:
            if component == "unet":
                b, _, f, h, w = (int(d) for d in key.split("x"))
                s = self.vae_scale_factor
                out.append(f"{b}x{f}x{s * h}x{s * w}")
        return sorted(out)

    def _packaged_calls(self, plan, requests: int) -> list[tuple[str, str]]:
        """(component, key) of the text encoder and UNet packages ``requests`` requests of
        ``plan`` call as one batch (the pose features and the decode go request by request)."""
        from engine.aoti import step_key
        from engine.precompile import planned_steps

        per = 2 if plan.cfg_on else 1
        ids = self.contracts["text_encoder"].inputs[0].shape({"prompts": per * requests})  # (prompts, tokens)
        calls = [("text_encoder", shape_key(ids))]
        for entry, depth, s in planned_steps(plan):
            component = "unet" if entry == "forward" else cache_component(entry, depth)
            calls.append((component, step_key(self.latent_channels, s.batch * requests, s.frames, s.height, s.width,
                                              self.vae_scale_factor)))
        return calls

    def fits_batch(self, plan, requests: int) -> bool:
        """Within the profile, and where one request of ``plan`` runs from packages, ``requests``
        of them together must too: a batch no package covers would compile just in time (minutes on
        a full-size UNet) in the middle of serving."""
        if not super().fits_batch(plan, requests):
            return False
        one = self._packaged_calls(plan, 1)
        return not all(c in self.packages for c in one) or all(c in self.packages
                                                                for c in self._packaged_calls(plan, requests))

    def compiled_steps_used(self) -> int:
        return self.package_calls + (self._jit.compiled_steps_used() if self._jit is not None else 0)

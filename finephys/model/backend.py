"""The backend contract: what the sampler calls on a model, whichever runtime runs it.

A backend (the reference ``FinePhysModel``, or one that runs an engine directory from
``engine.backends``) has:

- ``name``, ``config`` (FinePhysConfig), ``device``, ``dtype``, ``precision`` and
  ``capabilities``, which say what it can do beyond the four calls (no probing for attributes);
- ``parts`` with the pose stack (``lifter``, ``physnet``, fp32 PyTorch on every backend, on
  ``pose_device``) and the ``tokenizer``;
- the sampler's calls (the DDIM schedule comes from ``config.scheduler``): ``encode_text(prompts)``,
  ``encode_pose(heatmaps)``,
  ``predict_noise(sample, timestep, text, pose_features)``, ``decode_latents(latents)``, ``close()``, and
  with DeepCache ``predict_noise_cached`` / ``predict_noise_shallow``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from finephys.precision import Precision


@dataclass(frozen=True)
class Capabilities:
    """What a backend offers besides the four sampler calls."""

    kernels: bool = False  # the pose stack and heatmaps run through the fused Triton kernels
    async_decode: bool = False  # on CUDA the VAE may decode on a side stream (PyTorch modules only)
    deep_cache: range = range(0)  # depths DeepCache can cut the UNet at (empty: no --deep-cache)


class Backend(Protocol):
    name: str
    device: torch.device
    dtype: torch.dtype
    parts: object

    @property
    def pose_device(self) -> torch.device: ...

    @property
    def config(self): ...

    @property
    def precision(self) -> Precision: ...

    @property
    def capabilities(self) -> Capabilities: ...

    @property
    def latent_channels(self) -> int: ...

    @property
    def vae_scale_factor(self) -> int: ...

    def encode_text(self, prompts: list[str]) -> torch.Tensor: ...

    def encode_pose(self, heatmaps: torch.Tensor) -> list[torch.Tensor]: ...

    def predict_noise(self, sample, timestep, text, pose_features) -> torch.Tensor: ...

    def predict_noise_cached(self, sample, timestep, text, pose_features, depth): ...

    def predict_noise_shallow(self, sample, timestep, text, pose_features, deep, depth): ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor: ...

    def close(self) -> None: ...

    def warm_up(self) -> None: ...

    def compiled_shapes(self) -> list[str]: ...

    def compiled_steps_used(self) -> int | None: ...

    def fits_batch(self, plan, requests: int) -> bool: ...


class BackendBase:
    """What every backend derives from its ``config``, ``parts`` and ``dtype``; subclasses give
    the text encoder's forward (``_encode_ids``) and the other sampler calls."""

    name = "reference"
    profile = None  # an engine directory's shape profile (export.contract.ShapeProfile), where loaded from one

    @property
    def precision(self) -> Precision:
        return Precision.of(self.dtype)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    @property
    def pose_device(self) -> torch.device:
        """Where the pose stack (``parts.lifter``, ``parts.physnet``) runs: the model's device,
        unless a backend keeps it on the CPU."""
        return self.device

    @property
    def latent_channels(self) -> int:
        return int(self.config.unet.get("in_channels", 4))

    @property
    def vae_scale_factor(self) -> int:
        return self.config.vae_scale_factor

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        from finephys.model.text import tokenize

        return self._encode_ids(tokenize(self.parts.tokenizer, prompts).to(self.device))

    def close(self) -> None:
        """Release what the runtime holds beyond Python's reach (TensorRT contexts); nothing here."""

    def warm_up(self) -> None:
        """Make the first request as fast as later ones where the backend can (serve replicas call
        it after loading); nothing here."""

    def compiled_shapes(self) -> list[str]:
        """``BxFxHxW`` of the precompiled UNet steps this machine can load (the triton backend's)."""
        return []

    def compiled_steps_used(self) -> int | None:
        """How many UNet steps ran from precompiled steps so far; None where a backend has none."""
        return None

    def fits_batch(self, plan, requests: int) -> bool:
        """Whether ``requests`` requests of ``plan``'s shape may run as one batch (serve's batching
        asks; one request always runs, refused by the backend's own checks where it does not fit):
        within the engine's profile where there is one, else any number."""
        return self.profile is None or self.profile.fits_requests(requests, plan.cfg_on)

    def predict_noise_cached(self, sample, timestep, text, pose_features, depth):
        raise NotImplementedError(f"the {self.name} backend has no partial UNet (DeepCache)")

    def predict_noise_shallow(self, sample, timestep, text, pose_features, deep, depth):
        raise NotImplementedError(f"the {self.name} backend has no partial UNet (DeepCache)")

"""Assembly of the whole FinePhys model from its configs: pose stack, heatmap encoder, and the
SD 1.5 + AnimateDiff + LoRA backbone built with diffusers / transformers / peft."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from finephys.model.backend import BackendBase, Capabilities
from finephys.model.build import build_text_encoder, build_unet, build_vae
from finephys.model.config import FinePhysConfig
from finephys.model.encoder import HeatmapEncoder
from finephys.model.lifter import Lifter
from finephys.model.physnet import PhysNet
from finephys.model.unet import PoseGuidedUNet


@dataclass
class FinePhysParts:
    """The un-merged components as stored in a checkpoint (LoRA kept apart, peft naming)."""

    config: FinePhysConfig
    lifter: Lifter
    physnet: PhysNet
    encoder: HeatmapEncoder
    unet: nn.Module  # diffusers UNetMotionModel without LoRA
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    lora: dict = field(default_factory=dict)  # "unet.<module>.lora_A.weight" / "text_encoder...."


def new_parts(cfg: FinePhysConfig, tokenizer, seed: int = 0) -> FinePhysParts:
    """Randomly initialised components (seeded) for ``cfg``."""
    torch.manual_seed(seed)
    return FinePhysParts(
        config=cfg,
        lifter=Lifter(cfg.pose.lifter),
        physnet=PhysNet(cfg.pose.physnet),
        encoder=HeatmapEncoder(cfg.encoder),
        unet=build_unet(cfg),
        vae=build_vae(cfg),
        text_encoder=build_text_encoder(cfg),
        tokenizer=tokenizer,
    )


# LoRA targets: the spatial attention projections of the UNet (not the motion modules) and CLIP's.
LORA_UNET_TARGETS = re.compile(r".*attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)")
LORA_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def new_lora(parts: FinePhysParts, rank: int, gen: torch.Generator, text: bool = True,
             a_std: float = 0.1, b_std: float = 0.1) -> dict:
    """LoRA factors in peft naming for every targeted projection: A ~ N(0, a_std), B ~ N(0, b_std)
    (b_std = 0: a LoRA that starts as no change, for training)."""
    lora = {}
    targets = [("unet", n, m) for n, m in parts.unet.named_modules() if LORA_UNET_TARGETS.fullmatch(n)]
    if text:
        targets += [("text_encoder", n, m) for n, m in parts.text_encoder.named_modules()
                    if n.split(".")[-1] in LORA_TEXT_TARGETS]
    for prefix, name, mod in targets:
        lora[f"{prefix}.{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=gen) * a_std
        lora[f"{prefix}.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=gen) * b_std
    return lora


def _lora_state(lora: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1 :]: v for k, v in lora.items() if k.startswith(prefix + ".")}


def lora_weights(parts: FinePhysParts):
    """The checkpoint's LoRA as ``LoraWeights`` (uniform scale alpha / rank, per-module ranks)."""
    from finephys.model.convert.lora import LoraWeights

    cfg = parts.config.lora
    return LoraWeights(
        unet=_lora_state(parts.lora, "unet"), text_encoder=_lora_state(parts.lora, "text_encoder"),
        rank=cfg.rank, alpha=cfg.alpha,
    )


def apply_lora(parts: FinePhysParts) -> None:
    """Attach the checkpoint's LoRA to the UNet / text encoder as peft adapters (unmerged)."""
    if parts.config.lora is None or not parts.lora:
        return
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    lw = lora_weights(parts)
    if lw.unet:
        parts.unet.add_adapter(lw.lora_config("unet"))
        _set_strict(parts.unet, lw.unet, set_peft_model_state_dict, "LoRA (unet)")
    if lw.text_encoder:
        inject_adapter_in_model(lw.lora_config("text_encoder"), parts.text_encoder)
        _set_strict(parts.text_encoder, lw.text_encoder, set_peft_model_state_dict, "LoRA (text encoder)")


def _set_strict(module, sd, setter, what):
    from finephys.model.weights import check_state_dict

    expected = {
        re.sub(r"\.(lora_[AB])\.default\.", r".\1.", k): v for k, v in module.state_dict().items() if ".lora_" in k
    }
    check_state_dict(expected, sd, what)
    result = setter(module, sd)
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"{what}: peft left keys unused: {result.unexpected_keys[:5]}")


@dataclass
class FinePhysModel(BackendBase):
    """The reference backend: eager PyTorch over the assembled parts.

    Every backend offers the same four calls the sampler needs (``encode_text``,
    ``encode_pose``, ``predict_noise``, ``decode_latents``) plus ``config``, ``device`` and
    ``dtype`` (the contract: ``finephys.model.backend``); ``finephys.sampler`` drives any of them.
    """

    parts: FinePhysParts
    unet: PoseGuidedUNet
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(async_decode=True, deep_cache=self.unet.cache_depths())

    @property
    def config(self) -> FinePhysConfig:
        return self.parts.config

    def _encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.parts.text_encoder(ids)[0].to(self.dtype)

    @torch.no_grad()
    def encode_pose(self, heatmaps: torch.Tensor) -> list[torch.Tensor]:
        return self.parts.encoder(heatmaps.to(self.device, self.dtype))

    @torch.no_grad()
    def predict_noise(self, sample, timestep, text, pose_features) -> torch.Tensor:
        return self.unet(sample, timestep, text, pose_features)

    @torch.no_grad()
    def predict_noise_cached(self, sample, timestep, text, pose_features, depth):
        return self.unet.forward_and_cache(sample, timestep, text, pose_features, depth)

    @torch.no_grad()
    def predict_noise_shallow(self, sample, timestep, text, pose_features, deep, depth):
        return self.unet.forward_shallow(sample, timestep, text, pose_features, deep, depth)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.parts.vae
        return vae.decode(latents.to(self.device, self.dtype) / vae.config.scaling_factor).sample


def assemble(parts: FinePhysParts, device="cpu", dtype=torch.float32) -> FinePhysModel:
    apply_lora(parts)
    for m in (parts.lifter, parts.physnet, parts.encoder, parts.unet, parts.vae, parts.text_encoder):
        m.eval().requires_grad_(False)
    # The pose stack always runs in fp32: it is small and its outputs guide everything else.
    parts.lifter.to(device)
    parts.physnet.to(device)
    for m in (parts.encoder, parts.unet, parts.vae, parts.text_encoder):
        m.to(device)
        if dtype != torch.float32:
            m.to(dtype)
    return FinePhysModel(parts=parts, unet=PoseGuidedUNet(parts.unet), device=torch.device(device), dtype=dtype)

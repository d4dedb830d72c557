"""The diffusers / transformers modules of a FinePhys model, built from its config (random weights)."""
from __future__ import annotations

from finephys.model.config import FinePhysConfig


def build_unet(cfg: FinePhysConfig):
    from diffusers import UNetMotionModel

    return UNetMotionModel.from_config(dict(cfg.unet))


def build_vae(cfg: FinePhysConfig):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(dict(cfg.vae))


def build_text_encoder(cfg: FinePhysConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**cfg.text_encoder))


def build_scheduler(cfg: FinePhysConfig):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(dict(cfg.scheduler))

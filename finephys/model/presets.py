"""Full-size architecture: SD 1.5 + AnimateDiff v2 motion modules (random weights unless a
checkpoint is loaded). Used by benchmarks, which time the real shapes without real weights."""
from __future__ import annotations

from finephys.model.config import EncoderConfig, FinePhysConfig, LoraConfig
from finephys.model.convert.sd15 import SD15_TEXT_CONFIG, SD15_VAE_CONFIG
from finephys.model.demo import SCHEDULER

SD15_ANIMATEDIFF_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlockMotion"] * 3 + ["DownBlockMotion"],
    "up_block_types": ["UpBlockMotion"] + ["CrossAttnUpBlockMotion"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "cross_attention_dim": 768,
    "num_attention_heads": 8,
    "motion_max_seq_length": 32,
    "motion_num_attention_heads": 8,
    "use_motion_mid_block": True,
}


def full_size_config(lora_rank: int | None = 64) -> FinePhysConfig:
    return FinePhysConfig(
        encoder=EncoderConfig(channels=(320, 640, 1280, 1280)),
        unet=dict(SD15_ANIMATEDIFF_UNET),
        vae=dict(SD15_VAE_CONFIG),
        text_encoder=dict(SD15_TEXT_CONFIG),
        scheduler=dict(SCHEDULER),
        lora=None if lora_rank is None else LoraConfig(rank=lora_rank, alpha=float(lora_rank)),
        name="finephys-sd15-animatediff",
    )

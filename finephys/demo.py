"""The embedded demo model: the full FinePhys architecture at a size that runs on a CPU in
seconds, built from a fixed seed (no network). Its pose stack (lifter + PhysNet) loads the
shipped trained weights ``finephys/assets/demo_pose.safetensors`` (made by ``fpengine
train-pose`` on real motion capture; README, "Training the pose stack"); the other parts stay
seeded-random. ``fpengine init --demo DIR`` saves it."""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch

from .config import EncoderConfig, FinePhysConfig, LifterConfig, LoraConfig, PhysNetConfig, PoseConfig
from .model import FinePhysParts, new_parts
from .pose_weights import DEMO_WEIGHTS, load_pose_weights_into
from .text import load_tokenizer, write_clip_tokenizer

DEMO_SEED = 0
# The demo LoRA targets the spatial attention projections (not the motion modules) and CLIP's.
_UNET_LORA = re.compile(r".*attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)")
_TEXT_LORA = ("q_proj", "k_proj", "v_proj", "out_proj")
CHANNELS = (32, 64, 64, 64)

SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def demo_config() -> FinePhysConfig:
    unet = {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlockMotion"] * 3 + ["DownBlockMotion"],
        "up_block_types": ["UpBlockMotion"] + ["CrossAttnUpBlockMotion"] * 3,
        "block_out_channels": list(CHANNELS),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": 32,
        "num_attention_heads": 2,
        "motion_max_seq_length": 32,
        "motion_num_attention_heads": 2,
        "use_motion_mid_block": True,
    }
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [16, 32, 32, 32],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 128,
        "scaling_factor": 0.18215,
    }
    text = {
        "vocab_size": 49408,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 32,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }
    return FinePhysConfig(
        pose=PoseConfig(lifter=LifterConfig(dim=32, depth=2, heads=4), physnet=PhysNetConfig(hidden=64)),
        encoder=EncoderConfig(channels=CHANNELS, num_res_blocks=1),
        unet=unet,
        vae=vae,
        text_encoder=text,
        scheduler=dict(SCHEDULER),
        lora=LoraConfig(rank=4, alpha=4.0),
        height=128,
        width=128,
        num_frames=16,
        num_inference_steps=10,
        guidance_scale=7.5,
        name="finephys-demo",
    )


def _random_lora(parts: FinePhysParts, rank: int, gen: torch.Generator) -> dict:
    """Small random LoRA factors in peft naming for every targeted projection."""
    lora = {}
    targets = [("unet", n, m) for n, m in parts.unet.named_modules() if _UNET_LORA.fullmatch(n)]
    targets += [
        ("text_encoder", n, m) for n, m in parts.text_encoder.named_modules() if n.split(".")[-1] in _TEXT_LORA
    ]
    for prefix, name, mod in targets:
        lora[f"{prefix}.{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=gen) * 0.1
        lora[f"{prefix}.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=gen) * 0.1
    return lora


def make_demo_parts(tokenizer_dir: Path, seed: int = DEMO_SEED) -> FinePhysParts:
    cfg = demo_config()
    parts = new_parts(cfg, load_tokenizer(tokenizer_dir), seed=seed)
    load_pose_weights_into(DEMO_WEIGHTS, parts.lifter, parts.physnet)  # trained, shipped
    gen = torch.Generator().manual_seed(seed + 1)
    parts.lora = _random_lora(parts, cfg.lora.rank, gen)
    return parts


def load_demo(seed: int = DEMO_SEED) -> FinePhysParts:
    """The embedded demo model, in memory."""
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp))
        return make_demo_parts(Path(tmp), seed)

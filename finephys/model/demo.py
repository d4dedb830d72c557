"""The embedded demo model: the full FinePhys architecture at a size that runs on a CPU in
seconds. Its pose stack (lifter + PhysNet) loads ``finephys/assets/demo_pose.safetensors`` (made
by ``fpengine train-pose`` on real motion capture); the heatmap encoder, UNet, VAE, text encoder
and LoRA load ``finephys/assets/demo_model.safetensors`` (made by ``fpengine train --train all``
on figures rendered from motion capture; README, "Training the demo generator"). With
``trained=False`` those parts are seeded-random instead: the starting point of that training.
``fpengine init --demo DIR`` saves it."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from finephys.files import atomic_path
from finephys.errors import InputError
from finephys.model.weights import check_state_dict, read_safetensors

from finephys.model.config import EncoderConfig, FinePhysConfig, LoraConfig
from finephys.model.assembly import FinePhysParts, new_lora, new_parts
from finephys.model.pose_weights import DEMO_WEIGHTS, load_pose_weights_into, read_pose_config
from finephys.model.text import load_tokenizer, write_clip_tokenizer

DEMO_SEED = 0
CHANNELS = (48, 96, 96, 96)
VAE_SCALE_FACTOR = 4  # 32x32 latents at 128x128: the demo's thin limbs (stage 9); stages 1-7 used 8
_VAE_CHANNELS = (32, 64, 64, 64)
DEMO_MODEL = Path(__file__).resolve().parents[1] / "assets" / "demo_model.safetensors"
DEMO_MODEL_FORMAT = "fpengine-demo-model"
_PACKED = ("encoder", "unet", "vae", "text_encoder")

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


def demo_config(scaling_factor: float = 0.18215, vae_scale_factor: int = VAE_SCALE_FACTOR) -> FinePhysConfig:
    """The demo's architecture; ``vae_scale_factor`` (4 or 8) sets the VAE's down blocks and with
    them the latent size, the UNet's ``sample_size`` and the heatmap encoder's unshuffle."""
    if vae_scale_factor not in (4, 8):
        raise InputError(f"vae_scale_factor: {vae_scale_factor}, expected 4 or 8")
    blocks = vae_scale_factor.bit_length()  # 3 down blocks for 4, 4 for 8
    unet = {
        "sample_size": 128 // vae_scale_factor,
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
        "down_block_types": ["DownEncoderBlock2D"] * blocks,
        "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "block_out_channels": list(_VAE_CHANNELS[:blocks]),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 128,
        "scaling_factor": scaling_factor,
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
        pose=read_pose_config(DEMO_WEIGHTS),  # sizes and fusion weights as trained
        encoder=EncoderConfig(channels=CHANNELS, num_res_blocks=1, unshuffle=vae_scale_factor),
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


def make_demo_parts(tokenizer_dir: Path, seed: int = DEMO_SEED, trained: bool = True,
                    vae_scale_factor: int = VAE_SCALE_FACTOR) -> FinePhysParts:
    """The demo's parts: trained (the shipped weights, whose VAE scale factor the file records) or,
    with ``trained=False``, seeded-random apart from the pose stack, at ``vae_scale_factor``."""
    meta = _packed_metadata() if trained else None
    cfg = demo_config(float(meta["scaling_factor"]), _packed_factor(meta)) if meta else demo_config(
        vae_scale_factor=vae_scale_factor)
    parts = new_parts(cfg, load_tokenizer(tokenizer_dir), seed=seed)
    load_pose_weights_into(DEMO_WEIGHTS, parts.lifter, parts.physnet)  # trained, shipped
    gen = torch.Generator().manual_seed(seed + 1)
    parts.lora = new_lora(parts, cfg.lora.rank, gen, text=True)
    if trained:
        sd = read_safetensors(DEMO_MODEL)
        for name in _PACKED:
            module = getattr(parts, name)
            own = {k[len(name) + 1:]: v.float() for k, v in sd.items() if k.startswith(name + ".")}
            check_state_dict(module.state_dict(), own, f"{DEMO_MODEL} ({name})")
            module.load_state_dict(own)
        lora = {k[len("lora."):]: v.float() for k, v in sd.items() if k.startswith("lora.")}
        check_state_dict(parts.lora, lora, f"{DEMO_MODEL} (lora)")
        parts.lora = lora
    return parts


def _packed_metadata() -> dict:
    if not DEMO_MODEL.is_file():
        raise InputError(f"the trained demo weights {DEMO_MODEL} are missing (reinstall fpengine)")
    with safe_open(str(DEMO_MODEL), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != DEMO_MODEL_FORMAT:
        raise InputError(f"{DEMO_MODEL}: format {meta.get('format')!r}, expected {DEMO_MODEL_FORMAT!r}")
    return meta


def _packed_factor(meta: dict) -> int:
    """The packed weights' VAE scale factor; files packed before it was recorded (stages 1-7) used 8."""
    return int(meta.get("vae_scale_factor", 8))


def pack_demo(parts: FinePhysParts, path: Path = DEMO_MODEL, info: dict | None = None) -> Path:
    """Write a trained demo checkpoint's generator weights (fp16) as the shipped asset."""
    tensors = {}
    for name in _PACKED:
        for k, v in getattr(parts, name).state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().cpu().to(torch.float16).contiguous()
    for k, v in parts.lora.items():
        tensors[f"lora.{k}"] = v.detach().cpu().to(torch.float16).contiguous()
    meta = {"format": DEMO_MODEL_FORMAT, "scaling_factor": repr(float(parts.vae.config.scaling_factor)),
            "vae_scale_factor": str(parts.config.vae_scale_factor),
            "info": json.dumps(info or {}, sort_keys=True)}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def load_demo_pose_parts():
    """(config, lifter, PhysNet) of the embedded demo, without building its generator."""
    from finephys.model.lifter import Lifter
    from finephys.model.physnet import PhysNet

    cfg = demo_config()
    lifter, physnet = Lifter(cfg.pose.lifter), PhysNet(cfg.pose.physnet)
    load_pose_weights_into(DEMO_WEIGHTS, lifter, physnet)
    return cfg, lifter.eval(), physnet.eval()


def load_demo(seed: int = DEMO_SEED, trained: bool = True) -> FinePhysParts:
    """The embedded demo model, in memory."""
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp))
        return make_demo_parts(Path(tmp), seed, trained)


if __name__ == "__main__":  # python -m finephys.model.demo pack CHECKPOINT: install a trained demo
    import sys

    from finephys.model.checkpoint import load_checkpoint

    if len(sys.argv) != 3 or sys.argv[1] != "pack":
        sys.exit("usage: python -m finephys.model.demo pack CHECKPOINT_DIR")
    trained = load_checkpoint(Path(sys.argv[2]))
    factor = trained.config.vae_scale_factor
    if factor not in (4, 8) or trained.config.to_dict() != demo_config(
            float(trained.vae.config.scaling_factor), factor).to_dict():
        sys.exit(f"{sys.argv[2]}: not a demo-sized checkpoint")
    print(pack_demo(trained, info={"source": sys.argv[2]}))

"""Merged weights: the checkpoint's LoRA fused into the base weights, checked against the
unmerged (peft adapter) model, then cast to the engine precision and saved."""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from finephys.model.checkpoint import load_checkpoint
from finephys.errors import InputError
from finephys.precision import Precision
from finephys.model.assembly import FinePhysModel, assemble

from export.contract import contracts, trace_dims

MERGE_RTOL = 1e-4  # merged vs unmerged fp32 outputs: max |diff| <= MERGE_RTOL * max |unmerged|
# file -> (part, stays fp32); diffusers sub-folder layout, like the checkpoint
WEIGHT_FILES = {
    "unet/diffusion_pytorch_model.safetensors": ("unet", False),
    "vae/diffusion_pytorch_model.safetensors": ("vae", False),
    "text_encoder/model.safetensors": ("text_encoder", False),
    "pose/heatmap_encoder.safetensors": ("encoder", False),
    "pose/lifter.safetensors": ("lifter", True),
    "pose/physnet.safetensors": ("physnet", True),
}


@contextmanager
def quiet_diffusers():
    """Silence diffusers' notice on casting a model with ``.to(dtype)`` (we cast on purpose:
    nothing in these models is marked to stay fp32)."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def merge_lora(model: FinePhysModel) -> bool:
    """Fuse the peft LoRA adapters of the UNet and text encoder into their base weights and drop
    the adapter layers (diffusers' fuse API: ``fuse_lora`` + ``unload_lora`` on the UNet,
    ``fuse_text_encoder_lora`` + ``recurse_remove_peft_layers`` on the text encoder)."""
    from diffusers.loaders.lora_base import fuse_text_encoder_lora
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    p = model.parts
    merged = False
    try:
        if getattr(p.unet, "peft_config", None):
            p.unet.fuse_lora(safe_fusing=True)
            p.unet.unload_lora()
            merged = True
        if any(".lora_" in k for k in p.text_encoder.state_dict()):
            fuse_text_encoder_lora(p.text_encoder, safe_fusing=True)
            recurse_remove_peft_layers(p.text_encoder)
            merged = True
    except ValueError as exc:  # peft's safe merge: NaNs in the fused weights
        raise InputError(f"LoRA: merging gives invalid weights ({str(exc).splitlines()[0]})") from None
    left = [k for m in (p.unet, p.text_encoder) for k in m.state_dict() if ".lora_" in k or "base_layer" in k]
    if left:
        raise RuntimeError(f"LoRA merge left adapter weights behind: {left[:3]}")
    return merged


@torch.no_grad()
def _probe(model: FinePhysModel) -> dict[str, torch.Tensor]:
    """UNet and text encoder outputs on fixed random inputs (the shapes the export traces)."""
    c = contracts(model.config)
    dims = trace_dims(model.config)
    sample, t, text, *feats = c["unet"].sample_inputs(dims, "float32", seed=1)
    (ids,) = c["text_encoder"].sample_inputs(dims, "float32", seed=2)
    return {"unet": model.unet(sample, t, text, feats), "text_encoder": model.parts.text_encoder(ids)[0]}


def load_merged(ckpt: Path) -> tuple[FinePhysModel, dict]:
    """The checkpoint (hashes verified) assembled in fp32 on the CPU with its LoRA merged, and a
    report of the merge check: merged and unmerged outputs must agree to ``MERGE_RTOL``."""
    model = assemble(load_checkpoint(ckpt, verify_hashes=True))
    before = _probe(model)
    merged = merge_lora(model)
    after = _probe(model)
    report = {"lora_merged": merged}
    for name, ref in before.items():
        err = (after[name] - ref).abs().max().item()
        scale = ref.abs().max().item()
        report[f"{name}_max_abs_diff"] = err
        if not err <= MERGE_RTOL * max(scale, 1e-6):
            raise RuntimeError(f"LoRA merge changed the {name} output: max |diff| {err:.3g} vs max |out| {scale:.3g}")
    return model, report


def save_weights(model: FinePhysModel, out: Path, precision: str, tokenizer_src: Path) -> list[str]:
    """Write the merged weights (engine precision; pose stack fp32), configs, tokenizer and
    scheduler under ``out``; returns the files written, relative to ``out``."""
    dtype = Precision.of(precision).dtype
    p = model.parts
    cfg = model.config
    for rel, (name, keep_fp32) in WEIGHT_FILES.items():
        sd = getattr(p, name).state_dict()
        sd = {k: v.detach().to("cpu", torch.float32 if keep_fp32 or not v.is_floating_point() else dtype).contiguous()
              for k, v in sd.items()}
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(out / rel), metadata={"format": "pt", "precision": "float32" if keep_fp32 else precision})
    (out / "unet/config.json").write_text(json.dumps(dict(p.unet.config), indent=2, default=list))
    (out / "vae/config.json").write_text(json.dumps(dict(p.vae.config), indent=2, default=list))
    (out / "text_encoder/config.json").write_text(json.dumps(cfg.text_encoder, indent=2))
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler/scheduler_config.json").write_text(json.dumps(cfg.scheduler, indent=2))
    shutil.copytree(tokenizer_src, out / "tokenizer", dirs_exist_ok=True)
    return sorted(str(f.relative_to(out)) for d in ("unet", "vae", "text_encoder", "pose", "scheduler", "tokenizer")
                  for f in (out / d).rglob("*") if f.is_file())

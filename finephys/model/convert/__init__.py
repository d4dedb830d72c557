"""Loaders for the public weight formats that ``fpengine init`` composes a FinePhys checkpoint from.

Every loader is strict (DESIGN.md, convention 8): an explicit key map per foreign format, and
unexpected / missing / mis-shaped keys raise ``finephys.errors.InputError`` naming them. Torch
files are read only with ``torch.load(weights_only=True)``.

* ``sd15``: original SD 1.5 single files and diffusers folders -> UNet / VAE / CLIP text state dicts.
* ``animatediff``: AnimateDiff motion modules -> diffusers ``MotionAdapter`` config + state dict.
* ``lora``: diffusers/peft, old diffusers and kohya LoRA files -> peft ``lora_A`` / ``lora_B`` weights.
"""

from finephys.model.convert.animatediff import load_motion_module
from finephys.model.convert.lora import LoraWeights, load_lora
from finephys.model.convert.sd15 import (
    SD15_TEXT_CONFIG,
    SD15_UNET_CONFIG,
    SD15_VAE_CONFIG,
    load_sd15_diffusers_folder,
    load_sd15_single_file,
    read_weights,
)

__all__ = [
    "SD15_TEXT_CONFIG",
    "SD15_UNET_CONFIG",
    "SD15_VAE_CONFIG",
    "LoraWeights",
    "load_lora",
    "load_motion_module",
    "load_sd15_diffusers_folder",
    "load_sd15_single_file",
    "read_weights",
]

"""``fpengine init``: compose a FinePhys checkpoint from public parts.

SD 1.5 (diffusers folder or single file) + an AnimateDiff motion module -> ``UNetMotionModel``;
an optional LoRA; optional pose-stack weights (``fpengine train-pose`` output). Without pose
weights the pose stack is freshly initialised and the heatmap encoder's outputs are zero, so the
video model behaves exactly as SD 1.5 + AnimateDiff until the encoder is trained.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path


from finephys.model.config import EncoderConfig, FinePhysConfig, LoraConfig
from finephys.model.convert import load_lora, load_motion_module, load_sd15_diffusers_folder, load_sd15_single_file
from finephys.model.demo import SCHEDULER
from finephys.errors import InputError
from finephys.model.assembly import FinePhysParts, new_parts
from finephys.model.text import load_tokenizer
from finephys.model.weights import check_state_dict


def _load_base(base: Path) -> dict:
    if base.is_dir():
        return load_sd15_diffusers_folder(base)
    if base.is_file():
        return load_sd15_single_file(base)
    raise InputError(f"--base {base} does not exist")


def _strict(module, sd, what):
    check_state_dict(module.state_dict(), sd, what)
    module.load_state_dict(sd, strict=True)


def compose(base: Path, motion_module: Path, tokenizer_dir: Path, lora: Path | None = None,
            pose_weights: Path | None = None, seed: int = 0) -> FinePhysParts:
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    base_sd = _load_base(Path(base))
    configs = base_sd["configs"]
    if not Path(motion_module).is_file():
        raise InputError(f"--motion-module {motion_module} does not exist")
    adapter_cfg, adapter_sd = load_motion_module(Path(motion_module), configs["unet"])
    unet2d = UNet2DConditionModel.from_config(configs["unet"])
    _strict(unet2d, base_sd["unet"], f"--base {base} (unet)")
    adapter = MotionAdapter.from_config(adapter_cfg)
    _strict(adapter, adapter_sd, f"--motion-module {motion_module}")
    unet = UNetMotionModel.from_unet2d(unet2d, adapter)
    channels = tuple(configs["unet"]["block_out_channels"])
    cfg = FinePhysConfig(
        encoder=EncoderConfig(channels=channels),
        unet={k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
        vae={k: v for k, v in dict(configs["vae"]).items() if not k.startswith("_")},
        text_encoder={k: v for k, v in dict(configs["text_encoder"]).items() if not k.startswith("_")},
        scheduler=dict(SCHEDULER),
        num_frames=min(16, int(adapter_cfg.get("motion_max_seq_length", 32))),
        name="finephys",
    )
    parts = new_parts(cfg, load_tokenizer(tokenizer_dir), seed=seed)
    parts.unet = unet
    _strict(parts.vae, base_sd["vae"], f"--base {base} (vae)")
    _strict(parts.text_encoder, base_sd["text_encoder"], f"--base {base} (text encoder)")
    if pose_weights is None:
        parts.encoder.zero_outputs()
    else:
        load_pose_weights(parts, Path(pose_weights))
    if lora is not None:
        if not Path(lora).is_file():
            raise InputError(f"--lora {lora} does not exist")
        names = {n for n, _ in unet.named_modules()}
        text_names = {n for n, _ in parts.text_encoder.named_modules()}
        lw = load_lora(Path(lora), names, text_names)
        parts.config = dataclasses.replace(parts.config, lora=LoraConfig(rank=lw.rank, alpha=lw.alpha))
        parts.lora = {f"unet.{k}": v for k, v in lw.unet.items()}
        parts.lora.update({f"text_encoder.{k}": v for k, v in lw.text_encoder.items()})
    return parts


def load_pose_weights(parts: FinePhysParts, path: Path) -> None:
    """A safetensors file with ``lifter.*``, ``physnet.*`` and optionally ``encoder.*`` keys; its
    metadata ``pose_config`` (JSON of ``PoseConfig``) sets the pose-stack sizes."""
    import json

    from safetensors import safe_open

    from finephys.model.config import LifterConfig, PhysNetConfig, PoseConfig
    from finephys.model.lifter import Lifter
    from finephys.model.physnet import PhysNet
    from finephys.model.weights import read_safetensors

    sd = read_safetensors(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "pose_config" in meta:
        try:
            raw = json.loads(meta["pose_config"])
            pose = PoseConfig(**{**raw, "lifter": LifterConfig(**raw["lifter"]), "physnet": PhysNetConfig(**raw["physnet"])})
        except (ValueError, TypeError, KeyError) as exc:
            raise InputError(f"--pose-weights {path}: bad pose_config metadata ({exc})") from None
        parts.config = dataclasses.replace(parts.config, pose=pose)
        parts.lifter, parts.physnet = Lifter(pose.lifter), PhysNet(pose.physnet)
    groups = {"lifter": parts.lifter, "physnet": parts.physnet, "encoder": parts.encoder}
    bad = [k for k in sd if k.split(".", 1)[0] not in groups]
    if bad:
        check_state_dict({}, {k: sd[k] for k in bad}, f"--pose-weights {path}")
    for name, module in groups.items():
        part = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        if not part and name == "encoder":
            module.zero_outputs()
            continue
        _strict(module, part, f"--pose-weights {path} ({name})")


def tokenizer_source(base: Path) -> Path | None:
    """The base model's own tokenizer folder, when it has one."""
    folder = Path(base) / "tokenizer"
    return folder if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file() else None


__all__ = ["compose", "load_pose_weights", "tokenizer_source"]

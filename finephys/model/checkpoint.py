"""The FinePhys checkpoint: a folder that ``fpengine export --ckpt`` and ``generate --ckpt`` read.

    finephys.json                   format version, every component config, sha256 of every file
    pose/lifter.safetensors         pose stack (fp32)
    pose/physnet.safetensors
    pose/heatmap_encoder.safetensors
    unet/config.json + diffusion_pytorch_model.safetensors   UNetMotionModel (SD 1.5 + motion modules)
    vae/config.json + diffusion_pytorch_model.safetensors    AutoencoderKL
    text_encoder/config.json + model.safetensors             CLIPTextModel
    tokenizer/vocab.json, merges.txt, tokenizer_config.json
    scheduler/scheduler_config.json                          DDIM
    lora/pytorch_lora_weights.safetensors (optional)         peft naming, "unet." / "text_encoder." prefixes

Saving writes into a temporary sibling folder and renames it into place; loading is strict.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from finephys.model.config import FORMAT_VERSION, FinePhysConfig
from finephys.errors import InputError
from finephys.files import check_new_path, sha256, share_tree
from finephys.model.assembly import FinePhysParts, new_parts
from finephys.model.text import load_tokenizer
from finephys.model.weights import check_state_dict, load_strict, read_safetensors

MANIFEST = "finephys.json"
WEIGHT_FILES = {
    "lifter": "pose/lifter.safetensors",
    "physnet": "pose/physnet.safetensors",
    "encoder": "pose/heatmap_encoder.safetensors",
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}
LORA_FILE = "lora/pytorch_lora_weights.safetensors"


def _contiguous(sd: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_checkpoint(parts: FinePhysParts, out: Path, tokenizer_dir: Path, overwrite: bool = False) -> Path:
    out = Path(out)
    check_new_path(out, overwrite, "--out", folder=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        cfg = parts.config
        modules = {
            "lifter": parts.lifter, "physnet": parts.physnet, "encoder": parts.encoder,
            "unet": parts.unet, "vae": parts.vae, "text_encoder": parts.text_encoder,
        }
        for name, rel in WEIGHT_FILES.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            save_file(_contiguous(modules[name].state_dict()), str(tmp / rel))
        (tmp / "unet/config.json").write_text(json.dumps(dict(parts.unet.config), indent=2, default=list))
        (tmp / "vae/config.json").write_text(json.dumps(dict(parts.vae.config), indent=2, default=list))
        (tmp / "text_encoder/config.json").write_text(json.dumps(cfg.text_encoder, indent=2))
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler/scheduler_config.json").write_text(json.dumps(cfg.scheduler, indent=2))
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        if parts.lora:
            (tmp / "lora").mkdir()
            save_file(_contiguous(parts.lora), str(tmp / LORA_FILE))
        files = {
            str(p.relative_to(tmp)): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        manifest = {"format_version": FORMAT_VERSION, "config": cfg.to_dict(), "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        share_tree(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def parse_manifest_json(folder: Path, name: str, no_folder: str, no_manifest: str,
                        what: str = "a folder") -> tuple[Path, object]:
    """(path, parsed JSON) of the manifest ``folder / name``; InputError ``no_folder`` / ``no_manifest``
    when the folder / the file is missing, and one naming the file when it is not valid JSON."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: is a file, expected {what}")
    if not folder.is_dir():
        raise InputError(no_folder)
    path = folder / name
    if not path.is_file():
        raise InputError(no_manifest)
    try:
        return path, json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def read_manifest(folder: Path) -> dict:
    path, manifest = parse_manifest_json(folder, MANIFEST, f"checkpoint folder {folder} does not exist",
                                         f"{folder}: not a FinePhys checkpoint (no {MANIFEST})",
                                         "a FinePhys checkpoint folder")
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise InputError(f"{path}: format_version {version!r}, expected {FORMAT_VERSION}")
    return manifest


def read_config(folder: Path) -> FinePhysConfig:
    """A checkpoint's config alone (its manifest), no weights read."""
    return _config(Path(folder), read_manifest(folder))


def _config(folder: Path, manifest: dict) -> FinePhysConfig:
    try:
        return FinePhysConfig.from_dict(manifest["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{folder / MANIFEST}: bad config ({exc})") from None


def load_checkpoint(folder: Path, verify_hashes: bool = False) -> FinePhysParts:
    """Strictly rebuild every component from ``folder`` (fp32, CPU)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    cfg = _config(folder, manifest)
    if verify_hashes:
        for rel, digest in manifest.get("files", {}).items():
            if not (folder / rel).is_file():
                raise InputError(f"{folder}: file {rel} listed in {MANIFEST} is missing")
            if sha256(folder / rel) != digest:
                raise InputError(f"{folder}: file {rel} does not match its sha256 in {MANIFEST}")
    parts = new_parts(cfg, load_tokenizer(folder / "tokenizer"))
    for name, rel in WEIGHT_FILES.items():
        load_strict(getattr(parts, name), folder / rel)
    if (folder / LORA_FILE).exists():
        if cfg.lora is None:
            raise InputError(f"{folder}: {LORA_FILE} present but finephys.json has no lora config")
        parts.lora = read_safetensors(folder / LORA_FILE)
        bad = [k for k in parts.lora if not k.startswith(("unet.", "text_encoder."))]
        if bad:
            check_state_dict({}, {k: parts.lora[k] for k in bad}, str(folder / LORA_FILE))
    return parts


def load_pose_parts(folder: Path):
    """(config, lifter, PhysNet) of a checkpoint, without building the generator (eval mode)."""
    from finephys.model.lifter import Lifter
    from finephys.model.physnet import PhysNet

    folder = Path(folder)
    cfg = _config(folder, read_manifest(folder))
    lifter, physnet = Lifter(cfg.pose.lifter), PhysNet(cfg.pose.physnet)
    load_strict(lifter, folder / WEIGHT_FILES["lifter"])
    load_strict(physnet, folder / WEIGHT_FILES["physnet"])
    return cfg, lifter.eval(), physnet.eval()

"""The engine directory that ``fpengine export`` writes and every backend reads.

    manifest.json        format version, source checkpoint hash, configs, precision, shape
                         profile, contracts, stages, every file with its sha256 and size, tool
                         versions, the parity report
    unet/ vae/ text_encoder/ pose/heatmap_encoder.safetensors
                         weights with the LoRA merged, in the engine precision (fp16 by default),
                         diffusers sub-folder layout (config.json beside the weights)
    pose/lifter.safetensors, pose/physnet.safetensors
                         the pose stack, always fp32
    tokenizer/ scheduler/
    onnx/<component>.onnx (+ <component>.onnx.data past 2 GB)
    trt/<component>.trt<version>.<gpu>.<weights hash>.plan, trt/timing.cache  (where TensorRT is)
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path

from finephys.files import sha256
from finephys.model.checkpoint import parse_manifest_json
from finephys.model.config import FinePhysConfig
from finephys.errors import InputError

ENGINE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOOLS = ("torch", "diffusers", "transformers", "peft", "onnx", "onnxruntime", "tensorrt", "polygraphy", "fpengine")


def tool_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def stage_key(**inputs) -> str:
    """A stage's identity: the hash of everything its output depends on."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def file_entry(path: Path) -> dict:
    return {"sha256": sha256(path), "bytes": path.stat().st_size}


def read_engine_manifest(engine_dir: Path) -> dict:
    """The manifest of an engine directory, checked for its format version; InputError otherwise."""
    path, manifest = parse_manifest_json(
        engine_dir, MANIFEST, f"engine directory {engine_dir} does not exist",
        f"{engine_dir}: not an engine directory (no {MANIFEST}; write one with fpengine export)",
        "an engine directory (fpengine export writes one)")
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != ENGINE_FORMAT_VERSION:
        raise InputError(f"{path}: engine format_version {version!r}, this fpengine reads {ENGINE_FORMAT_VERSION} "
                         "(re-export the checkpoint with this version)")
    for key in ("config", "precision", "profile", "files", "stages"):
        if key not in manifest:
            raise InputError(f"{path}: no '{key}' entry")
    return manifest


def engine_config(manifest: dict) -> FinePhysConfig:
    try:
        return FinePhysConfig.from_dict(manifest["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{MANIFEST}: bad config ({exc})") from None


def verify_files(engine_dir: Path, manifest: dict, files=None, full: bool = False) -> None:
    """Every listed file (or the given subset) exists with its size (``full``: and its sha256)."""
    engine_dir = Path(engine_dir)
    listed = manifest["files"]
    for rel in listed if files is None else files:
        entry = listed.get(rel)
        if entry is None:
            raise InputError(f"{engine_dir}: {rel} is not listed in {MANIFEST}")
        path = engine_dir / rel
        if not path.is_file():
            raise InputError(f"{engine_dir}: {rel} listed in {MANIFEST} is missing")
        if path.stat().st_size != entry["bytes"] or (full and sha256(path) != entry["sha256"]):
            raise InputError(f"{engine_dir}: {rel} does not match its sha256 in {MANIFEST} (corrupt; re-export)")

"""Pose-stack weights file (what ``fpengine train-pose`` writes, the demo ships, ``eval-pose``
and ``init --pose-weights`` read): one safetensors file with ``lifter.*`` and ``physnet.*``
tensors; its metadata holds ``pose_config`` (JSON of ``PoseConfig``: lifter and PhysNet sizes,
fusion weight), the model ``fps``, the format and how it was trained (``info``). Loading is
strict: configs must match the modules, keys and shapes must match exactly.
"""
from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from finephys.files import atomic_path
from finephys.model.config import LifterConfig, PhysNetConfig, PoseConfig
from finephys.errors import InputError
from finephys.model.lifter import Lifter
from finephys.model.physnet import PhysNet
from finephys.model.weights import check_state_dict

FORMAT = "fpengine-pose"
FORMAT_VERSION = "2"  # 2: the lifter reads 2D normalised by the person (1: by the image width)
DEMO_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "demo_pose.safetensors"


def save_pose_weights(path, lifter: Lifter, physnet: PhysNet, pose_cfg: PoseConfig, fps: float,
                      info: dict | None = None, dtype=torch.float16) -> Path:
    """Write atomically; float tensors are stored in ``dtype`` (fp16 keeps the file small)."""
    path = Path(path)
    if pose_cfg.lifter != lifter.cfg or pose_cfg.physnet != physnet.cfg:
        raise ValueError("save_pose_weights: pose_cfg does not describe the modules")
    tensors = {}
    for prefix, module in (("lifter", lifter), ("physnet", physnet)):
        for k, v in module.state_dict().items():
            v = v.detach().cpu()
            tensors[f"{prefix}.{k}"] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "pose_config": json.dumps(dataclasses.asdict(pose_cfg)),
        "fps": repr(float(fps)), "info": json.dumps(info or {}, sort_keys=True),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        _sort_header(tmp)
    return path


def _sort_header(path: Path) -> None:
    """Rewrite the safetensors JSON header with sorted keys: safetensors writes the metadata in
    hash-map order, which changes from run to run; sorted, one seed gives one identical file."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n:])


def read_pose_weights(path) -> tuple[dict, dict]:
    """(tensors as fp32, metadata) of a pose weights file; InputError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found, expected pose-stack weights (.safetensors "
                         f"from fpengine train-pose)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable safetensors file "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    return tensors, _parse_metadata(path, meta)


def read_pose_config(path) -> PoseConfig:
    """The pose config a weights file was trained with (sizes and fusion weights), header only."""
    with safe_open(str(path), framework="pt") as f:
        return _parse_metadata(Path(path), f.metadata() or {})["pose"]


def _parse_metadata(path: Path, meta: dict) -> dict:
    if meta.get("format") == FORMAT and meta.get("format_version") == "1":
        raise InputError(f"{path}: pose weights of format version 1, whose lifter reads 2D divided by the image "
                         f"width; this version normalises by the person (format {FORMAT_VERSION}): retrain them "
                         f"with fpengine train-pose")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: metadata format {meta.get('format')!r} version "
                         f"{meta.get('format_version')!r}, expected {FORMAT!r} version "
                         f"{FORMAT_VERSION} (a file written by fpengine train-pose)")
    try:
        raw = json.loads(meta["pose_config"])
        pose = PoseConfig(**{**raw, "lifter": LifterConfig(**raw["lifter"]),
                             "physnet": PhysNetConfig(**raw["physnet"])})
        meta = dict(meta, pose=pose, lifter=pose.lifter, physnet=pose.physnet, fps=float(meta["fps"]),
                    fuse_weight=pose.fuse_weight, info=json.loads(meta.get("info", "{}")))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: bad pose-stack metadata ({type(exc).__name__}: {exc})") from None
    return meta


def load_pose_weights_into(path, lifter: Lifter, physnet: PhysNet) -> dict:
    """Strictly load a weights file into existing modules (configs must match); -> metadata."""
    tensors, meta = read_pose_weights(path)
    for name, module, cfg in (("lifter", lifter, meta["lifter"]), ("physnet", physnet, meta["physnet"])):
        if cfg != module.cfg:
            raise InputError(f"{path}: {name} config {dataclasses.asdict(cfg)}, expected "
                             f"{dataclasses.asdict(module.cfg)} (the model's)")
        part = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        check_state_dict(module.state_dict(), part, f"{path} ({name})")
        module.load_state_dict(part, strict=True)
    other = [k for k in tensors if not k.startswith(("lifter.", "physnet."))]
    if other:
        check_state_dict({}, {k: tensors[k] for k in other}, str(path))
    return meta


def load_pose_stack(path) -> tuple[Lifter, PhysNet, dict]:
    """Build the lifter and PhysNet a weights file describes and load them (eval mode)."""
    _, meta = read_pose_weights(path)
    lifter, physnet = Lifter(meta["lifter"]), PhysNet(meta["physnet"])
    meta = load_pose_weights_into(path, lifter, physnet)
    return lifter.eval(), physnet.eval(), meta

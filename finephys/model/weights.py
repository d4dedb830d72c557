"""Strict weight loading (DESIGN.md convention 8): every unexpected, missing or mis-shaped key
is an error that names it. Nothing is unpickled; we read and write safetensors."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from finephys.errors import InputError


def _names(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_state_dict(expected: dict, found: dict, source: str) -> None:
    """expected/found map key -> tensor (or shape); raise InputError listing every mismatch."""
    problems = []
    unexpected = set(found) - set(expected)
    missing = set(expected) - set(found)
    shape = lambda v: tuple(v.shape) if hasattr(v, "shape") else tuple(v)  # noqa: E731
    bad = [k for k in set(found) & set(expected) if shape(found[k]) != shape(expected[k])]
    if missing:
        problems.append(f"{len(missing)} missing keys ({_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_names(unexpected)})")
    if bad:
        k = sorted(bad)[0]
        problems.append(
            f"{len(bad)} mis-shaped keys ({_names(bad)}; e.g. {k}: expected {shape(expected[k])}, found {shape(found[k])})"
        )
    if problems:
        raise InputError(f"{source}: " + "; ".join(problems))


def read_safetensors(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file missing: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None


def load_strict(module: torch.nn.Module, path: Path) -> None:
    sd = read_safetensors(path)
    check_state_dict(module.state_dict(), sd, str(path))
    module.load_state_dict(sd, strict=True)

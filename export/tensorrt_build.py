"""TensorRT plans from the ONNX graphs, through polygraphy as its documentation shows.

The network is parsed strongly typed (TensorRT 10+): the graph's own tensor types decide the
precision, so an fp16 graph builds an fp16 engine and no precision flag is set. One optimisation
profile per plan, from the component's contract; one timing cache per engine directory. Plans are
named by TensorRT version, GPU and the hash of the graph they were built from; a plan built
elsewhere is refused (see ``plan_name`` and ``engine.backends.tensorrt``).

This module only runs where ``import tensorrt`` works (not on the machines this project is
tested on): keep it small.
"""
from __future__ import annotations

import re
from pathlib import Path

TIMING_CACHE = "trt/timing.cache"


def tensorrt_status() -> tuple[bool, str]:
    """(available, one line saying why not or which version)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        return False, f"TensorRT is not installed here ({exc})"
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        return False, "polygraphy is not installed (pip install 'fpengine[tensorrt]')"
    import torch

    if not torch.cuda.is_available():
        return False, "TensorRT needs a CUDA GPU and none is visible"
    return True, f"TensorRT {trt.__version__}"


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(torch.cuda.current_device())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def plan_name(component: str, trt_version: str, gpu: str, weights_sha256: str) -> str:
    return f"trt/{component}.trt{_slug(trt_version)}.{_slug(gpu)}.{weights_sha256[:16]}.plan"


def build_plan(onnx_path: Path, shapes: dict, plan_path: Path, timing_cache: Path) -> None:
    """``shapes``: {input name: (min, opt, max)} from ``Contract.profile_shapes``."""
    from polygraphy.backend.trt import CreateConfig, Profile, engine_from_network, network_from_onnx_path, save_engine

    network = network_from_onnx_path(str(onnx_path), strongly_typed=True)
    profile = Profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.add(name, min=lo, opt=opt, max=hi)
    config = CreateConfig(profiles=[profile], load_timing_cache=str(timing_cache))
    engine = engine_from_network(network, config=config, save_timing_cache=str(timing_cache))
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    save_engine(engine, path=str(plan_path))

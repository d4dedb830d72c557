"""Backends that run an engine directory written by ``fpengine export``.

``load_backend(engine_dir, name, device)`` returns a backend: the contract of
``finephys.model.backend`` (what the sampler calls, the pose stack in ``parts``, and explicit
``capabilities``), as the reference ``FinePhysModel`` has it.
"""
from __future__ import annotations

from pathlib import Path

from finephys.errors import InputError

ENGINE_BACKENDS = ("onnxruntime", "tensorrt", "triton")


def _tensorrt_usable(engine_dir: Path) -> bool:
    from export.manifest import read_engine_manifest

    from engine.backends.tensorrt import matching_plans

    try:
        matching_plans(read_engine_manifest(engine_dir))
    except InputError:
        return False
    return True


def resolve(engine_dir: Path, name: str, device: str | None) -> tuple[str, str]:
    """(backend, device) for ``auto`` values: on a GPU TensorRT where its plans fit this machine,
    else the triton backend; ONNX Runtime on the CPU; CUDA where the backend can use it."""
    import torch

    cuda = torch.cuda.is_available()
    if name == "tensorrt":
        from export.tensorrt_build import tensorrt_status

        ok, why = tensorrt_status()
        if not ok:
            raise InputError(f"--backend tensorrt: {why}")
    if name == "triton" and not cuda:
        raise InputError("--backend triton needs a CUDA GPU and this machine has none (use --backend onnxruntime)")
    if name == "auto":
        if cuda:
            name = "tensorrt" if _tensorrt_usable(engine_dir) else "triton"
        else:
            name = "onnxruntime"
    if name not in ENGINE_BACKENDS:
        raise InputError(f"--backend {name}: an engine directory runs on {', '.join(ENGINE_BACKENDS)} or auto "
                         "(the reference backend runs a checkpoint: --ckpt)")
    if device in (None, "auto"):
        if name == "onnxruntime":
            from engine.backends.onnxruntime import cuda_provider_available

            device = "cuda" if cuda and cuda_provider_available() else "cpu"
        else:
            device = "cuda"
    if device.startswith("cuda") and not cuda:
        raise InputError(f"--device {device}: no CUDA device on this machine, expected cpu")
    return name, device


def load_backend(engine_dir: Path, name: str = "auto", device: str | None = "auto", require_compiled: bool = False):
    """``require_compiled``: the triton backend refuses UNet steps the engine has not precompiled."""
    name, device = resolve(Path(engine_dir), name, device)
    if require_compiled and name != "triton":
        raise InputError(f"--require-compiled: the compiled steps run on --backend triton, not {name}")
    if name == "onnxruntime":
        from engine.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(engine_dir, device)
    if name == "triton":  # the packaged components where the engine carries them for this machine
        from engine.backends.aoti import load_packaged

        model = load_packaged(engine_dir, device, require_compiled=require_compiled)
        if model is not None:
            return model
        from engine.backends.triton import load_triton_backend

        return load_triton_backend(engine_dir, device, require_compiled=require_compiled)
    from engine.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(engine_dir, device)

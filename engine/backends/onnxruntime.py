"""The ``onnxruntime`` backend: the engine's ONNX graphs through ONNX Runtime, the CUDA
execution provider where it is installed and asked for, the CPU provider otherwise.

An fp16 engine runs as it is on the CPU provider: where the CPU provider has no fp16 kernel for a
node, ONNX Runtime inserts casts and computes that node in fp32 (tensors between nodes stay fp16).
"""
from __future__ import annotations

from pathlib import Path

import torch

from finephys.errors import InputError

from engine.backends.base import GraphBackend


def cuda_provider_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


class OnnxRuntimeBackend(GraphBackend):
    name = "onnxruntime"

    def __init__(self, engine_dir: Path, device: str = "cpu"):
        import onnxruntime as ort

        super().__init__(engine_dir, device)
        if self.device.type == "cuda":
            if not cuda_provider_available():
                raise InputError("--backend onnxruntime --device cuda: this onnxruntime has no CUDA execution "
                                 "provider (install onnxruntime-gpu, or use --device cpu)")
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.sessions = {}
        for component in self.contracts:
            path = self.engine_dir / f"onnx/{component}.onnx"
            try:
                self.sessions[component] = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception types
                raise InputError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})") from None

    def _run(self, component: str, feeds: dict) -> list[torch.Tensor]:
        arrays = {k: v.detach().cpu().numpy() for k, v in feeds.items()}
        outputs = self.sessions[component].run(None, arrays)
        return [torch.from_numpy(o).to(self.device) for o in outputs]

"""The ``tensorrt`` backend: the engine's TensorRT plans run with polygraphy's ``TrtRunner``
(PyTorch CUDA tensors in and out, as its documentation shows). Plans built for another GPU or
another TensorRT version are refused. Runs only where ``import tensorrt`` works."""
from __future__ import annotations

from pathlib import Path

import torch

from export.tensorrt_build import gpu_name, tensorrt_status
from finephys.errors import InputError

from engine.backends.base import GraphBackend


def matching_plans(manifest: dict) -> dict:
    """{component: plan file} built here (this TensorRT version and GPU); InputError saying why not."""
    ok, why = tensorrt_status()
    if not ok:
        raise InputError(f"--backend tensorrt: {why}")
    import tensorrt as trt

    info = manifest.get("tensorrt") or {}
    plans = info.get("plans") or {}
    if not plans:
        raise InputError("--backend tensorrt: this engine has no TensorRT plans "
                         f"({info.get('status', 'TensorRT was not available at export')}); re-run fpengine export here")
    here = (trt.__version__, gpu_name())
    for component, plan in plans.items():
        built = (plan["version"], plan["gpu"])
        if built != here:
            raise InputError(f"--backend tensorrt: the {component} plan was built with TensorRT {built[0]} for "
                             f"{built[1]}; this machine has TensorRT {here[0]} on {here[1]} (re-run fpengine export here)")
    return {c: p["file"] for c, p in plans.items()}


class TensorRTBackend(GraphBackend):
    name = "tensorrt"

    def __init__(self, engine_dir: Path, device: str = "cuda"):
        super().__init__(engine_dir, device)
        if self.device.type != "cuda":
            raise InputError("--backend tensorrt needs a CUDA device (--device cuda)")
        from polygraphy.backend.common import bytes_from_path
        from polygraphy.backend.trt import TrtRunner, engine_from_bytes

        self.runners = {}
        for component, rel in matching_plans(self.manifest).items():
            runner = TrtRunner(engine_from_bytes(bytes_from_path(str(self.engine_dir / rel))))
            runner.activate()
            self.runners[component] = runner

    def _run(self, component: str, feeds: dict) -> list[torch.Tensor]:
        feeds = {k: v.to(self.device) for k, v in feeds.items()}
        out = self.runners[component].infer(feeds, copy_outputs_to_host=False)
        return [out[name].clone() for name in self.contracts[component].output_names]

    def close(self) -> None:
        for runner in self.runners.values():
            runner.deactivate()
        self.runners = {}

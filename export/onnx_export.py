"""ONNX graphs of the four components, traced from the merged model with the names, dtypes and
dynamic dimensions of their contracts (TorchScript-based ``torch.onnx.export``: it needs no
extra packages, and the UNet's motion modules trace cleanly with every dimension dynamic).

The fp16 graphs are traced from the fp16 modules, so every tensor type in them is what the
model computes in (a strongly typed graph for TensorRT 10+); what stays fp32: the timestep input
and the sinusoidal time projection that reads it, and the pose stack, which is not exported.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from finephys.model.unet import PoseGuidedUNet

from export.contract import Contract

OPSET = 17
EXTERNAL_DATA_LIMIT = 2**31 - 2**26  # protobuf's 2 GB cap, with room for the graph itself


class TextEncoderGraph(nn.Module):
    """CLIP's last hidden state. Traced with transformers' eager attention: the exporter's
    ``scaled_dot_product_attention(is_causal=True)`` builds its causal mask from fp32 constants,
    which turns an fp16 graph into a mixed one that ONNX Runtime and TensorRT reject."""

    def __init__(self, text_encoder):
        super().__init__()
        text_encoder.set_attn_implementation("eager")
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids)[0]


class HeatmapEncoderGraph(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, heatmaps):
        return tuple(self.encoder(heatmaps))


class UNetGraph(nn.Module):
    """``PoseGuidedUNet.forward`` with the pose features as separate graph inputs."""

    def __init__(self, unet):
        super().__init__()
        self.unet = PoseGuidedUNet(unet)

    def forward(self, sample, timestep, encoder_hidden_states, *pose_features):
        return self.unet(sample, timestep, encoder_hidden_states, list(pose_features))


class VaeDecoderGraph(nn.Module):
    """Unscaled latents in (the 1/scaling_factor is part of the graph), images in [-1, 1] out."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)

    def forward(self, latents):
        return self.vae.decode(latents / self.scale).sample


def graph_module(parts, component: str) -> nn.Module:
    module = {
        "text_encoder": lambda: TextEncoderGraph(parts.text_encoder),
        "heatmap_encoder": lambda: HeatmapEncoderGraph(parts.encoder),
        "unet": lambda: UNetGraph(parts.unet),
        "vae_decoder": lambda: VaeDecoderGraph(parts.vae),
    }[component]()
    return module.eval().requires_grad_(False)


def _tree_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@torch.no_grad()
def export_onnx(module: nn.Module, contract: Contract, inputs: tuple, out_dir: Path,
                external_limit: int = EXTERNAL_DATA_LIMIT) -> list[Path]:
    """Trace ``module`` on ``inputs`` into ``out_dir/<component>.onnx``; a graph whose weights
    pass ``external_limit`` bytes keeps them in one ``<component>.onnx.data`` beside it.
    Returns the files written."""
    import onnx

    name = contract.component
    work = out_dir / f".{name}.trace"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarning on shape arithmetic, exporter deprecation
            torch.onnx.export(
                module, inputs, str(work / "model.onnx"), input_names=contract.input_names,
                output_names=contract.output_names, dynamic_axes=contract.dynamic_axes(),
                opset_version=OPSET, do_constant_folding=True, dynamo=False,
            )
        graph = out_dir / f"{name}.onnx"
        if _tree_bytes(work) > external_limit:
            proto = onnx.load(str(work / "model.onnx"), load_external_data=True)
            onnx.save_model(proto, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f"{name}.onnx.data", size_threshold=1024)
            files = [graph, out_dir / f"{name}.onnx.data"]
        else:
            (work / "model.onnx").replace(graph)
            files = [graph]
        onnx.checker.check_model(str(graph), full_check=True)  # types and shapes too
        return files
    finally:
        shutil.rmtree(work, ignore_errors=True)

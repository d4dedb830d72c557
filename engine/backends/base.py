"""What the engine backends share: the engine directory, the pose stack (PyTorch, fp32, from the
engine's own weights), the tokenizer, and the four sampler calls in terms of the
export contracts. A backend adds ``_run(component, feeds) -> outputs`` for its runtime."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from export.contract import ShapeProfile, contracts
from export.manifest import engine_config, read_engine_manifest, verify_files
from finephys.model.config import FinePhysConfig
from finephys.model.lifter import Lifter
from finephys.model.backend import BackendBase
from finephys.model.physnet import PhysNet
from finephys.model.text import load_tokenizer
from finephys.model.weights import load_strict
from finephys.precision import Precision


@dataclass
class PoseParts:
    """The parts of ``FinePhysParts`` that run in PyTorch on every backend."""

    lifter: Lifter
    physnet: PhysNet
    tokenizer: object


def load_pose_parts(engine_dir: Path, config: FinePhysConfig, device) -> PoseParts:
    """The pose stack (fp32) and tokenizer of an engine directory, for any backend."""
    engine_dir = Path(engine_dir)
    lifter, physnet = Lifter(config.pose.lifter), PhysNet(config.pose.physnet)
    load_strict(lifter, engine_dir / "pose/lifter.safetensors")
    load_strict(physnet, engine_dir / "pose/physnet.safetensors")
    for m in (lifter, physnet):
        m.eval().requires_grad_(False).to(device)
    return PoseParts(lifter, physnet, load_tokenizer(engine_dir / "tokenizer"))


class EngineFiles:
    """An engine directory opened for reading: its manifest (files checked against their
    hashes), config, precision and shape profile."""

    def __init__(self, engine_dir: Path):
        self.engine_dir = Path(engine_dir)
        self.manifest = read_engine_manifest(self.engine_dir)
        verify_files(self.engine_dir, self.manifest)
        self.config = engine_config(self.manifest)
        self.dtype = Precision.of(self.manifest["precision"]).dtype
        self.profile = ShapeProfile.from_dict(self.manifest["profile"])


class GraphBackend(BackendBase):
    """Base of the backends that run exported graphs; see ``finephys.model.backend`` for the
    contract the sampler drives."""

    name = "graphs"

    def __init__(self, engine_dir: Path, device: str = "cpu"):
        files = EngineFiles(engine_dir)
        self.engine_dir, self.manifest, self.profile = files.engine_dir, files.manifest, files.profile
        self._config, self.dtype = files.config, files.dtype
        self.contracts = contracts(self._config)
        self.device = torch.device(device)
        self.parts = load_pose_parts(self.engine_dir, self._config, self.pose_device)

    @property
    def config(self) -> FinePhysConfig:
        return self._config

    def _run(self, component: str, feeds: dict) -> list[torch.Tensor]:
        raise NotImplementedError

    def _typed(self, component: str, *tensors) -> list[torch.Tensor]:
        """The inputs cast to ``component``'s contract dtypes, contiguous."""
        spec = self.contracts[component].inputs
        return [t.to(s.torch_dtype(self.precision)).contiguous() for s, t in zip(spec, tensors)]

    def _call(self, component: str, *tensors) -> list[torch.Tensor]:
        """Cast the inputs to the contract's dtypes, run the component's graph."""
        names = [s.name for s in self.contracts[component].inputs]
        return self._run(component, dict(zip(names, self._typed(component, *tensors))))

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        self.profile.check("prompts", prompts=len(prompts))
        return super().encode_text(prompts)

    def _encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self._call("text_encoder", ids)[0]

    @torch.no_grad()
    def encode_pose(self, heatmaps: torch.Tensor) -> list[torch.Tensor]:
        frames, _, height, width = heatmaps.shape
        self.profile.check("pose heatmaps", frames=frames, height=height, width=width)
        return self._call("heatmap_encoder", heatmaps)

    @torch.no_grad()
    def predict_noise(self, sample, timestep, text, pose_features) -> torch.Tensor:
        return self._call("unet", *self._step_inputs(sample, timestep, text, pose_features))[0]

    def _step_inputs(self, sample, timestep, text, pose_features) -> tuple:
        """The UNet graph's inputs in its contract's order: one timestep for the whole batch."""
        self.profile.check("UNet sample", batch=sample.shape[0])
        t = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1)
        if t.numel() > 1 and not bool((t == t[0]).all()):
            raise ValueError("the exported UNet takes one timestep for the whole batch")
        return (sample, t[:1], text, *pose_features)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        self.profile.check("VAE decode", decode_batch=latents.shape[0])
        return self._call("vae_decoder", latents)[0]

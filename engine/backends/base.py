"""What the engine backends share: the engine directory, the pose stack (PyTorch, fp32, from the
engine's own weights), the tokenizer, the scheduler, and the four sampler calls in terms of the
export contracts. A backend adds ``_run(component, feeds) -> outputs`` for its runtime."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from export.contract import ShapeProfile, contracts
from export.manifest import engine_config, read_engine_manifest, verify_files
from finephys.config import FinePhysConfig
from finephys.lifter import Lifter
from finephys.model import BackendBase
from finephys.physnet import PhysNet
from finephys.text import load_tokenizer
from finephys.weights import load_strict


@dataclass
class PoseParts:
    """The parts of ``FinePhysParts`` that run in PyTorch on every backend."""

    lifter: Lifter
    physnet: PhysNet
    tokenizer: object


class GraphBackend(BackendBase):
    """Base of the backends that run exported graphs; see ``finephys.model.FinePhysModel`` for
    the interface the sampler drives."""

    name = "graphs"

    def __init__(self, engine_dir: Path, device: str = "cpu"):
        self.engine_dir = Path(engine_dir)
        self.manifest = read_engine_manifest(self.engine_dir)
        verify_files(self.engine_dir, self.manifest)
        self._config = engine_config(self.manifest)
        self.precision = self.manifest["precision"]
        self.dtype = {"float16": torch.float16, "float32": torch.float32}[self.precision]
        self.profile = ShapeProfile.from_dict(self.manifest["profile"])
        self.contracts = contracts(self._config)
        self.device = torch.device(device)
        cfg = self._config
        lifter, physnet = Lifter(cfg.pose.lifter), PhysNet(cfg.pose.physnet)
        load_strict(lifter, self.engine_dir / "pose/lifter.safetensors")
        load_strict(physnet, self.engine_dir / "pose/physnet.safetensors")
        for m in (lifter, physnet):
            m.eval().requires_grad_(False).to(self.device)
        self.parts = PoseParts(lifter, physnet, load_tokenizer(self.engine_dir / "tokenizer"))

    @property
    def config(self) -> FinePhysConfig:
        return self._config

    def _run(self, component: str, feeds: dict) -> list[torch.Tensor]:
        raise NotImplementedError

    def _call(self, component: str, *tensors) -> list[torch.Tensor]:
        """Cast the inputs to the contract's dtypes, run the component's graph."""
        spec = self.contracts[component].inputs
        feeds = {s.name: t.to(s.torch_dtype(self.precision)).contiguous() for s, t in zip(spec, tensors)}
        return self._run(component, feeds)

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
        self.profile.check("UNet sample", batch=sample.shape[0])
        t = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1)
        if t.numel() > 1 and not bool((t == t[0]).all()):
            raise ValueError("the exported UNet takes one timestep for the whole batch")
        return self._call("unet", sample, t[:1], text, *pose_features)[0]

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        self.profile.check("VAE decode", decode_batch=latents.shape[0])
        return self._call("vae_decoder", latents)[0]

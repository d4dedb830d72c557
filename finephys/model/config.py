"""Frozen configuration dataclasses, serialised to JSON beside every artefact (DESIGN.md conv. 6)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

FORMAT_VERSION = 1
_KINDS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,)}


def _typed(cls, values: dict, where: str = ""):
    """``cls(**values)``, after checking that every number, text or dict field holds one (a config
    read from JSON may not): a TypeError names the first field that does not."""
    if not isinstance(values, dict):
        raise TypeError(f"{where.rstrip('.') or 'config'} is {values!r}, expected an object of fields")
    for f in dataclasses.fields(cls):
        kinds, v = _KINDS.get(str(f.type)), values.get(f.name)
        if f.name in values and kinds and (not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds)):
            raise TypeError(f"{where}{f.name} is {v!r}, expected {f.type}")
    return cls(**values)


@dataclass(frozen=True)
class LifterConfig:
    num_joints: int = 17
    dim: int = 256
    depth: int = 4
    heads: int = 8
    mlp_ratio: float = 2.0
    max_frames: int = 24  # longer clips are lifted in overlapping windows of this length (as trained)


@dataclass(frozen=True)
class PhysNetConfig:
    num_joints: int = 17
    hidden: int = 512
    layers: int = 2


@dataclass(frozen=True)
class EncoderConfig:
    num_joints: int = 17
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    unshuffle: int = 8


@dataclass(frozen=True)
class PoseConfig:
    lifter: LifterConfig = field(default_factory=LifterConfig)
    physnet: PhysNetConfig = field(default_factory=PhysNetConfig)
    # S_fused = w S_dd + (1 - w) S_pp: one w, or one per joint (``fpengine train-pose`` fits them)
    fuse_weight: float | tuple[float, ...] = 0.5
    heatmap_sigma: float = 6.0  # pixels at 512 px; scaled with the video size

    def __post_init__(self):
        w = self.fuse_weight
        if isinstance(w, (list, tuple)):  # JSON gives a list
            if len(w) != self.lifter.num_joints:
                raise ValueError(f"fuse_weight: {len(w)} weights, expected one per joint ({self.lifter.num_joints})")
            w = tuple(float(x) for x in w)
        else:
            w = float(w)
        if not all(0.0 <= x <= 1.0 for x in (w if isinstance(w, tuple) else (w,))):
            raise ValueError(f"fuse_weight: {self.fuse_weight!r}, expected weights in [0, 1]")
        object.__setattr__(self, "fuse_weight", w)


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 64
    alpha: float = 64.0  # every module's update is (alpha / rank) * B @ A


@dataclass(frozen=True)
class FinePhysConfig:
    """Everything needed to rebuild the model; the diffusers parts keep their own config dicts."""

    pose: PoseConfig = field(default_factory=PoseConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    unet: dict = field(default_factory=dict)
    motion_adapter: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)
    text_encoder: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)
    lora: LoraConfig | None = None
    layout: str = "h36m17"
    fps: float = 8.0
    height: int = 512
    width: int = 512
    num_frames: int = 16
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    name: str = "finephys"
    format_version: int = FORMAT_VERSION

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel on each side: 2 per VAE down block after the first (diffusers'
        ``vae_scale_factor``); 8 for SD 1.5."""
        return 2 ** (len(self.vae.get("block_out_channels", (0,) * 4)) - 1)

    @property
    def max_frames(self) -> int:
        """The longest frame window the motion modules take (their positional encoding's length)."""
        return int(self.unet.get("motion_max_seq_length", 32))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "FinePhysConfig":
        d = dict(d)
        pose = dict(d.get("pose", {}))
        pose["lifter"] = _typed(LifterConfig, pose.get("lifter", {}), "pose.lifter.")
        pose["physnet"] = _typed(PhysNetConfig, pose.get("physnet", {}), "pose.physnet.")
        d["pose"] = _typed(PoseConfig, pose, "pose.")
        enc = dict(d.get("encoder", {}))
        if "channels" in enc:
            enc["channels"] = tuple(enc["channels"])
        d["encoder"] = _typed(EncoderConfig, enc, "encoder.")
        if d.get("lora") is not None:
            d["lora"] = _typed(LoraConfig, d["lora"], "lora.")
        return _typed(FinePhysConfig, d)

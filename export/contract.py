"""One export contract per component (DESIGN.md convention 7).

A contract names a component's graph inputs and outputs, their dtypes and their dimensions, some
fixed (channels, the 77 CLIP tokens), some symbolic. The symbolic dimensions all derive from five
numbers: the video ``batch`` (1 without classifier-free guidance, 2 with), ``frames``, the video
``height`` and ``width``, the number of ``prompts`` the text encoder sees and the number of
``decode_batch`` frames the VAE decodes at once. ``ShapeProfile`` holds min/opt/max for each of them.

The ONNX export (dynamic axes, trace inputs), the TensorRT build (optimisation profiles) and the
runtimes (input names, dtypes, profile checks) all read these contracts; nothing else spells an
input name.

Symbolic dimensions:
    batch            video batch of the UNet sample (B)
    frames           frames per clip (F)
    batch_frames     B*F: UNetMotionModel takes text embeddings and intrablock residuals per frame
    height, width    video size; latent_height = height / the VAE's scale factor (8 for SD 1.5) ...
    feat{k}_height   size of pose feature k: latent size halved k times, rounding up (stride-2 3x3
                     convolutions with padding 1, the UNet's downsampler arithmetic)
    prompts          text encoder batch
    decode_batch     VAE decoder batch (frames decoded at once)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from finephys.model.config import FinePhysConfig
from finephys.errors import InputError
from finephys.precision import Precision

COMPONENTS = ("text_encoder", "heatmap_encoder", "unet", "vae_decoder")
TEXT_LENGTH = 77
VAE_CHUNK = 8  # finephys.sampler.stream.decode decodes 8 frames at a time
@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple  # int (fixed) or str (symbolic, see the module docstring)
    dtype: str  # "float32", "int32" or "engine" (the export precision)

    def torch_dtype(self, precision: str) -> torch.dtype:
        """The engine's precision for "engine" tensors, else the tensor's own (float32, int32)."""
        return Precision.of(precision).dtype if self.dtype == "engine" else getattr(torch, self.dtype)

    def shape(self, dims: dict) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else int(dims[d]) for d in self.dims)


@dataclass(frozen=True)
class Contract:
    component: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict:
        """For ``torch.onnx.export``: every symbolic dimension, by tensor and axis."""
        return {
            t.name: {i: d for i, d in enumerate(t.dims) if isinstance(d, str)}
            for t in self.inputs + self.outputs
            if any(isinstance(d, str) for d in t.dims)
        }

    def sample_inputs(self, dims: dict, precision: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random inputs of the right shapes and dtypes (for tracing and probing)."""
        gen = torch.Generator().manual_seed(seed)
        out = []
        for t in self.inputs:
            shape, dtype = t.shape(dims), t.torch_dtype(precision)
            if t.name == "input_ids":
                out.append(torch.randint(0, 49406, shape, generator=gen).to(dtype))
            elif t.name == "timestep":
                out.append(torch.full(shape, 981.0, dtype=dtype))
            else:
                out.append(torch.randn(shape, generator=gen).to(dtype))
        return tuple(out)

    def profile_shapes(self, profile: "ShapeProfile", cfg: FinePhysConfig) -> dict:
        """{input name: (min shape, opt shape, max shape)} of every input with a symbolic
        dimension, for a TensorRT optimisation profile (static inputs need none)."""
        ends = [resolve_dims(cfg, **profile.point(i)) for i in range(3)]
        return {t.name: tuple(t.shape(d) for d in ends) for t in self.inputs
                if any(isinstance(d, str) for d in t.dims)}


def _triple(value, what: str) -> tuple[int, int, int]:
    t = tuple(int(v) for v in value)
    if len(t) != 3 or not (1 <= t[0] <= t[1] <= t[2]):
        raise InputError(f"{what}: expected MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX, got {':'.join(map(str, value))}")
    return t


@dataclass(frozen=True)
class ShapeProfile:
    """min/opt/max of every free dimension; the engine accepts exactly this range."""

    batch: tuple[int, int, int] = (1, 2, 2)
    frames: tuple[int, int, int] = (1, 16, 32)
    height: tuple[int, int, int] = (256, 512, 1024)
    width: tuple[int, int, int] = (256, 512, 1024)
    prompts: tuple[int, int, int] = (1, 2, 2)
    decode_batch: tuple[int, int, int] = (1, VAE_CHUNK, VAE_CHUNK)

    def __post_init__(self):
        for name in ("batch", "frames", "height", "width", "prompts", "decode_batch"):
            object.__setattr__(self, name, _triple(getattr(self, name), name))
        for name in ("height", "width"):
            if any(v % 8 for v in getattr(self, name)):
                raise InputError(f"{name}: profile sizes must be multiples of 8, got {getattr(self, name)}")

    def point(self, i: int) -> dict:
        """i = 0, 1, 2: the min, opt or max corner as keyword arguments of ``resolve_dims``."""
        return {k: v[i] for k, v in asdict(self).items()}

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @staticmethod
    def from_dict(d: dict) -> "ShapeProfile":
        return ShapeProfile(**{k: tuple(v) for k, v in d.items()})

    @staticmethod
    def default(cfg: FinePhysConfig) -> "ShapeProfile":
        """opt at the model's defaults; frames up to the motion modules' reach; sizes 1/2x..2x."""
        max_frames = cfg.max_frames
        opt_frames = min(cfg.num_frames, max_frames)
        side = lambda v: (max(64, v // 2 // 8 * 8), v, 2 * v)  # noqa: E731
        return ShapeProfile(frames=(1, opt_frames, max_frames), height=side(cfg.height), width=side(cfg.width),
                            decode_batch=(1, min(VAE_CHUNK, opt_frames), VAE_CHUNK))

    def fits_requests(self, requests: int, cfg_on: bool) -> bool:
        """Whether ``requests`` generation requests fit one batch: their UNet batch and prompts (two
        each with guidance) within the profile. The pose features and the decode run request by
        request, so frames do not add up."""
        n = requests * (2 if cfg_on else 1)
        return n <= self.batch[2] and n <= self.prompts[2]

    def check(self, what: str, advice: str = "re-export with", **values) -> None:
        """InputError unless every given dimension lies within the profile (the message ends with
        ``advice`` a wider option: at export time, "export with")."""
        for name, v in values.items():
            lo, _, hi = getattr(self, name)
            if not lo <= v <= hi:
                option = {"prompts": "batch"}.get(name, name)
                hint = f" ({advice} a wider --{option})" if option in ("frames", "height", "width", "batch") else ""
                raise InputError(f"{what}: {name} {v} is outside this engine's profile {lo}..{hi}{hint}")


def num_downsamples(cfg: FinePhysConfig) -> int:
    return len(cfg.unet.get("block_out_channels", (320, 640, 1280, 1280))) - 1


def resolve_dims(cfg: FinePhysConfig, batch: int, frames: int, height: int, width: int,
                 prompts: int = 2, decode_batch: int = 1) -> dict:
    f = cfg.vae_scale_factor
    lh, lw = height // f, width // f
    dims = {"batch": batch, "frames": frames, "batch_frames": batch * frames, "height": height,
            "width": width, "latent_height": lh, "latent_width": lw, "prompts": prompts, "decode_batch": decode_batch}
    for k in range(len(cfg.encoder.channels)):
        dims[f"feat{k}_height"], dims[f"feat{k}_width"] = lh, lw
        lh, lw = math.ceil(lh / 2), math.ceil(lw / 2)
    return dims


def trace_dims(cfg: FinePhysConfig) -> dict:
    """The shapes the ONNX export traces with: every dimension distinct and > 1, and a latent
    width that is not a multiple of 2**(number of upsamplers), so that the traced UNet takes the
    upsample-to-the-skip-size path that is right for every size."""
    n = max(1, num_downsamples(cfg))
    f = cfg.vae_scale_factor
    return resolve_dims(cfg, batch=2, frames=3, height=f * 2**n, width=f * (2**n + 2 ** (n - 1)),
                        prompts=2, decode_batch=3)


def contracts(cfg: FinePhysConfig) -> dict[str, Contract]:
    c_lat = int(cfg.unet.get("in_channels", 4))
    c_text = int(cfg.text_encoder.get("hidden_size", 768))
    joints = cfg.encoder.num_joints
    feats = [(f"pose_feat_{k}", c, f"feat{k}_height", f"feat{k}_width") for k, c in enumerate(cfg.encoder.channels)]
    return {
        "text_encoder": Contract(
            "text_encoder",
            (TensorSpec("input_ids", ("prompts", TEXT_LENGTH), "int32"),),
            (TensorSpec("text_embeddings", ("prompts", TEXT_LENGTH, c_text), "engine"),),
        ),
        "heatmap_encoder": Contract(
            "heatmap_encoder",
            (TensorSpec("heatmaps", ("frames", joints, "height", "width"), "engine"),),
            tuple(TensorSpec(n, ("frames", c, h, w), "engine") for n, c, h, w in feats),
        ),
        "unet": Contract(
            "unet",
            (
                TensorSpec("sample", ("batch", c_lat, "frames", "latent_height", "latent_width"), "engine"),
                TensorSpec("timestep", (1,), "float32"),
                TensorSpec("encoder_hidden_states", ("batch_frames", TEXT_LENGTH, c_text), "engine"),
                *(TensorSpec(n, ("batch_frames", c, h, w), "engine") for n, c, h, w in feats),
            ),
            (TensorSpec("noise_pred", ("batch", c_lat, "frames", "latent_height", "latent_width"), "engine"),),
        ),
        "vae_decoder": Contract(
            "vae_decoder",
            (TensorSpec("latents", ("decode_batch", c_lat, "latent_height", "latent_width"), "engine"),),
            (TensorSpec("images", ("decode_batch", 3, "height", "width"), "engine"),),
        ),
    }

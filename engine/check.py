"""``fpengine check``: one clip, one seed, through an engine backend and through the reference.

Reported: the max absolute and the relative error of the final latents (relative = max |a - b| /
max |reference|), and the PSNR of the decoded uint8 frames against the reference frames.

Tolerances (DESIGN.md convention 3):
  * fp32 engine: relative latent error <= ``FP32_RTOL`` (1e-3).
  * fp16 engine: err(backend, ref_fp32) <= 2 * err(torch_fp16, ref_fp32) + ``FP16_ATOL``, err = max
    absolute latent error. torch_fp16 is eager PyTorch in fp16 on the same device: the reference
    model (peft LoRA unmerged, as diffusers runs it) with its text encoder, heatmap encoder, UNet
    and VAE cast to fp16; the pose stack, the initial noise and the DDIM update stay fp32, exactly
    as in every backend. On a CPU this runs PyTorch's CPU Half kernels (slow for a full-size model,
    fine for the small shapes the check uses); where an op has no Half kernel on the device the
    check stops with one line saying so, and the rule must be measured on a CUDA device.
The reference is the engine's source checkpoint (its finephys.json hash must match the manifest).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from finephys.poses.clip import PoseClip
from finephys.errors import InputError

FP32_RTOL = 1e-3
FP16_ATOL = 1e-3
CHECK_PROMPT = "a person walking"


def check_clip(num_frames: int, fps: float, size: int = 256) -> PoseClip:
    """A deterministic walking-like H36M-17 clip: the lifter's standing pose with swinging limbs."""
    from finephys.model.lifter import _STANDING_POSE

    t = np.arange(max(num_frames, 3)) / fps
    swing = 0.15 * np.sin(2 * np.pi * 1.0 * t)[:, None]
    kp = np.repeat(np.asarray(_STANDING_POSE, dtype=np.float64)[None, :, :2], len(t), axis=0)
    for joint, sign, amount in ((2, 1, 0.5), (3, 1, 1.0), (5, -1, 0.5), (6, -1, 1.0),
                                (12, 1, 0.5), (13, 1, 1.0), (15, -1, 0.5), (16, -1, 1.0)):
        kp[:, joint, 0] += sign * amount * swing[:, 0]
    kp = kp * (size * 0.5) + size / 2
    return PoseClip(kp.astype(np.float32), np.ones(kp.shape[:2], np.float32), "h36m17", (size, size), float(fps))


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB of uint8 frames; None when they are identical (infinite PSNR, not JSON)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _db(value: float | None) -> str:
    return "identical" if value is None else f"{value:.1f} dB"


def _errors(latents, ref_latents, frames, ref_frames) -> dict:
    err = (latents.float() - ref_latents.float()).abs().max().item()
    scale = ref_latents.abs().max().item()
    return {"latents_max_abs_err": err, "latents_rel_err": err / max(scale, 1e-12), "psnr_db": psnr(frames, ref_frames)}


def _reference(ckpt: Path, device: str, dtype):
    from export.merge import quiet_diffusers
    from finephys.model.checkpoint import load_checkpoint
    from finephys.model.assembly import assemble

    with quiet_diffusers():
        return assemble(load_checkpoint(ckpt), device=device, dtype=dtype)


def _source_checkpoint(manifest: dict, ckpt: Path | None) -> Path:
    from finephys.files import sha256
    from finephys.model.checkpoint import MANIFEST

    source = manifest.get("source") or {}
    path = Path(ckpt) if ckpt is not None else Path(source.get("path", ""))
    if not (path / MANIFEST).is_file():
        where = "--ckpt" if ckpt is not None else "the engine's source checkpoint"
        what = "is not a FinePhys checkpoint folder" if path.is_dir() else "is not there"
        raise InputError(f"{where} {path} {what} (pass --ckpt with the checkpoint this engine was exported from)")
    if sha256(path / MANIFEST) != source.get("sha256"):
        raise InputError(f"{path} is not the checkpoint this engine was exported from (its {MANIFEST} hash differs)")
    return path


def _compiled_shape(model):
    """The first guidance-on shape the backend's precompiled steps cover here, if any."""
    from engine.precompile import StepShape

    shapes = [StepShape.parse(s) for s in model.compiled_shapes()]
    return next((s for s in shapes if s.batch == 2), None)


def check_engine(engine_dir: Path, backend: str = "auto", ckpt: Path | None = None, device: str | None = "auto",
                 num_frames: int | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 2, guidance_scale: float | None = None, seed: int = 0,
                 prompt: str = CHECK_PROMPT, clip: PoseClip | None = None, progress: bool = False) -> dict:
    from export.manifest import read_engine_manifest, verify_files

    from engine.backends import load_backend
    from finephys.sampler.options import GenerateOptions
    from finephys.sampler.stream import generate

    manifest = read_engine_manifest(engine_dir)
    verify_files(engine_dir, manifest, full=True)
    ckpt = _source_checkpoint(manifest, ckpt)
    model = load_backend(engine_dir, backend, device)
    profile = model.profile
    compiled = _compiled_shape(model) if (num_frames, height, width) == (None, None, None) else None
    if compiled is not None:  # the triton backend checks what it will run: its precompiled steps
        num_frames, height, width = compiled.frames, compiled.height, compiled.width
    height = profile.height[0] if height is None else height
    width = profile.width[0] if width is None else width
    frames = 4 if num_frames is None else num_frames
    profile.check("check", frames=frames, height=height, width=width)
    if guidance_scale is None and not profile.fits_requests(1, model.config.guidance_scale > 1):
        guidance_scale = 1.0  # an engine without a guided batch (export --batch 1:1:1) is checked without guidance
    opts = GenerateOptions(prompt, num_frames=frames, height=height, width=width,
                           num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed)
    clip = check_clip(frames, model.config.fps) if clip is None else clip
    out = generate(model, clip, opts, progress=progress)
    ref = generate(_reference(ckpt, str(model.device), torch.float32), clip, opts, progress=progress)
    report = {
        "backend": model.name, "device": str(model.device), "precision": model.precision, "seed": seed,
        "frames": frames, "height": height, "width": width, "num_inference_steps": num_inference_steps,
        "guidance_scale": model.config.guidance_scale if guidance_scale is None else guidance_scale,
        **_errors(out.latents, ref.latents, out.frames, ref.frames),
    }
    if model.compiled_steps_used() is not None:
        report["compiled_steps_used"] = model.compiled_steps_used()
    if model.precision == "float32":
        report["tolerance"] = FP32_RTOL
        report["rule"] = f"relative latent error {report['latents_rel_err']:.3g} <= {FP32_RTOL:g}"
        report["passed"] = report["latents_rel_err"] <= FP32_RTOL
    else:
        try:
            half = generate(_reference(ckpt, str(model.device), torch.float16), clip, opts, progress=progress)
        except (RuntimeError, NotImplementedError) as exc:
            raise InputError(f"check: eager PyTorch fp16 does not run on {model.device} "
                             f"({str(exc).splitlines()[0]}); run the check with --device cuda") from None
        report["torch_fp16"] = _errors(half.latents, ref.latents, half.frames, ref.frames)
        bound = 2 * report["torch_fp16"]["latents_max_abs_err"] + FP16_ATOL
        report["tolerance"] = bound
        report["rule"] = (f"max latent error {report['latents_max_abs_err']:.3g} <= 2 * torch fp16's "
                          f"{report['torch_fp16']['latents_max_abs_err']:.3g} + {FP16_ATOL:g} = {bound:.3g}")
        report["passed"] = report["latents_max_abs_err"] <= bound
    model.close()
    return report


def format_report(report: dict) -> list[str]:
    r = report
    lines = [
        f"backend {r['backend']} ({r['precision']}, {r['device']}) vs reference fp32: seed {r['seed']}, "
        f"{r['frames']} frames {r['height']}x{r['width']}, {r['num_inference_steps']} steps, guidance {r['guidance_scale']:g}",
        f"latents: max abs error {r['latents_max_abs_err']:.3g}, relative error {r['latents_rel_err']:.3g}; "
        f"frames PSNR {_db(r['psnr_db'])}",
    ]
    if "torch_fp16" in r:
        t = r["torch_fp16"]
        lines.append(f"torch fp16: max abs error {t['latents_max_abs_err']:.3g}, relative error "
                     f"{t['latents_rel_err']:.3g}; frames PSNR {_db(t['psnr_db'])}")
    if "compiled_steps_used" in r:
        lines.append(f"precompiled UNet steps used: {r['compiled_steps_used']}")
    lines.append(f"{'PASS' if r['passed'] else 'FAIL'}: {r['rule']}")
    return lines


def export_parity(engine_dir: Path, ckpt: Path, settings: dict, log) -> dict:
    """The parity check ``fpengine export`` runs on the engine it is writing: the onnxruntime
    backend against the reference, its report logged line by line. Device auto: ONNX Runtime's
    CUDA provider where installed (the reference runs beside it)."""
    report = check_engine(engine_dir, "onnxruntime", ckpt=ckpt, device="auto", **settings)
    for line in format_report(report):
        log(f"  {line}")
    return report

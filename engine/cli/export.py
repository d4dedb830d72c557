"""``fpengine export`` and ``fpengine check`` (registered on the main group in ``engine.cli.app``)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from finephys.errors import InputError

from engine.cli.common import PATH, DeviceChoice

MAX_SIDE = 8192  # a profile's largest height or width (generate's --max-pixels caps the window anyway)
MAX_BATCH = 128  # a profile's largest UNet batch


def _range(option: str, text: str | None):
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(":"))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise InputError(f"{option} {text}: expected MIN:OPT:MAX, three integers")
    if option in ("--height", "--width") and values[2] > MAX_SIDE:
        raise InputError(f"{option} {text}: expected sizes up to {MAX_SIDE} pixels")
    if option == "--batch" and (values[0] != 1 or values[2] > MAX_BATCH):
        raise InputError(f"{option} {text}: expected MIN 1 (a request without guidance) and MAX up to {MAX_BATCH} "
                         "(serve's --max-batch-size 64 with guidance)")
    return values


def _compile_spec(cfg, profile, compile_: bool, shapes: tuple, depths: tuple):
    """The --compile options checked against the profile and the UNet (before any slow work)."""
    if not compile_:
        if shapes or depths:
            raise InputError("--compile-shape and --compile-deep-cache go with --compile")
        return None
    from engine.precompile import StepShape
    from finephys.model.unet import cache_depths_of

    parsed = [StepShape.parse(s) for s in shapes] or [StepShape(min(2, profile.batch[2]), profile.frames[1],
                                                                profile.height[1], profile.width[1])]
    for s in parsed:
        profile.check(f"--compile-shape {s}", "export with", batch=s.batch, frames=s.frames, height=s.height,
                      width=s.width)
    allowed = cache_depths_of(cfg.unet)
    for d in depths:
        if d not in allowed:
            raise InputError(f"--compile-deep-cache {d}: this UNet's DeepCache depths are {allowed.start}..{allowed.stop - 1}")
    from engine.backends.triton import CompileSpec

    return CompileSpec(parsed, list(depths))


@click.command("export")
@click.option("--ckpt", type=PATH, required=True, help="FinePhys checkpoint folder (fpengine init writes one).")
@click.option("--out", type=PATH, required=True, help="Engine directory to write.")
@click.option("--precision", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True,
              help="Weights and graphs (the pose stack stays fp32).")
@click.option("--frames", "frames", default=None, metavar="MIN:OPT:MAX", help="Frames the engine accepts (default 1:model:motion window).")
@click.option("--height", "height", default=None, metavar="MIN:OPT:MAX", help="Video heights (multiples of 8; default half..twice the model's).")
@click.option("--width", "width", default=None, metavar="MIN:OPT:MAX", help="Video widths (multiples of 8).")
@click.option("--batch", "batch", default=None, metavar="MIN:OPT:MAX",
              help="UNet batch the engine accepts, and prompts with it: 2 a request with guidance, 1 without "
                   "(default 1:2:2). A wider MAX lets serve run several requests as one batch.")
@click.option("--no-check", is_flag=True, help="Skip the parity check against the reference.")
@click.option("--force", is_flag=True, help="Rebuild every stage, even those that are up to date.")
@click.option("--overwrite", is_flag=True, help="Replace an existing directory that is not this checkpoint's engine.")
@click.option("--compile", "compile_", is_flag=True,
              help="Compile the triton backend for this GPU (CUDA) into AOTInductor packages, so generate starts in seconds.")
@click.option("--compile-shape", "compile_shapes", multiple=True, metavar="[BATCHx]FRAMESxHEIGHTxWIDTH",
              help="With --compile: a UNet step shape (repeatable; batch 2 = guidance on, the default). "
                   "Default: the profile's OPT frames, height and width.")
@click.option("--compile-deep-cache", "compile_depths", type=int, multiple=True, metavar="DEPTH",
              help="With --compile: also DeepCache's two UNet calls at this --deep-cache-depth (repeatable).")
@click.option("--triton-only", is_flag=True,
              help="Only what the triton backend runs: no ONNX graphs, TensorRT plans or onnxruntime check.")
def export(ckpt, out, precision, frames, height, width, batch, no_check, force, overwrite, compile_, compile_shapes,
           compile_depths, triton_only):
    """Turn a checkpoint into an engine directory: fp16 weights with the LoRA merged, ONNX graphs,
    TensorRT plans where TensorRT is installed, a manifest and a parity report; with --compile, the
    triton backend's precompiled UNet steps."""
    from dataclasses import replace

    from engine.check import export_parity
    from export.build import export_engine
    from export.contract import ShapeProfile
    from finephys.model.checkpoint import read_config

    if not Path(ckpt).exists():
        raise InputError(f"--ckpt {ckpt} does not exist")
    ranges = {k: _range(f"--{k}", v) for k, v in (("frames", frames), ("height", height), ("width", width),
                                                   ("batch", batch))}
    ranges["prompts"] = ranges["batch"]  # one prompt a UNet batch entry (the prompt and the negative one)
    cfg = read_config(ckpt)
    profile = replace(ShapeProfile.default(cfg), **{k: v for k, v in ranges.items() if v})
    spec = _compile_spec(cfg, profile, compile_, compile_shapes, compile_depths)
    from engine.cli.common import terminate_as_interrupt

    with terminate_as_interrupt():  # SIGTERM cleans up like Ctrl-C: the temporary directory goes
        manifest = export_engine(ckpt, out, precision=precision, profile=profile, overwrite=overwrite, force=force,
                                 check=None if no_check else export_parity, log=lambda line: click.echo(line, err=True),
                                 compile=spec, graphs=not triton_only)
    size = sum(e["bytes"] for e in manifest["files"].values()) / 2**20
    click.echo(f"wrote {out}: {manifest['precision']} engine, {len(manifest['files'])} files, {size:.1f} MiB", err=True)


@click.command("check")
@click.option("--engine", type=PATH, required=True, help="Engine directory (fpengine export writes one).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt", "triton"]), default="auto", show_default=True,
              help="The runtime checked against the reference (eager fp32 PyTorch): onnxruntime (the ONNX graphs), "
                   "tensorrt (the plans), triton (CUDA: fp16 with the project's kernels); auto: tensorrt where the "
                   "engine has plans for this GPU, else triton on CUDA, else onnxruntime.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--ckpt", type=PATH, default=None, help="The source checkpoint (default: the path in the manifest).")
@click.option("--device", type=DeviceChoice(), default="auto", show_default=True,
              help="Where to run: auto (CUDA where there is a GPU, else the CPU), cpu, cuda or cuda:N.")
@click.option("--poses", type=PATH, default=None, help="Pose clip (default: a built-in walking clip).")
@click.option("--prompt", default="a person walking", show_default=True)
@click.option("--frames", "num_frames", type=int, default=None,
              help="Default: 4 (triton with precompiled steps: their frames, height and width).")
@click.option("--height", type=int, default=None, help="Default: the profile's smallest.")
@click.option("--width", type=int, default=None, help="Default: the profile's smallest.")
@click.option("--steps", "num_inference_steps", type=int, default=2, show_default=True)
@click.option("--guidance", "guidance_scale", type=float, default=None, help="Default: the model's.")
def check(engine, backend, seed, ckpt, device, poses, prompt, num_frames, height, width, num_inference_steps,
          guidance_scale):
    """Run one clip through BACKEND and through the reference; exit 1 outside the tolerance."""
    from finephys.poses.clip import load_clip

    from engine.check import check_engine, format_report

    clip = None
    if poses is not None:
        if not Path(poses).exists():
            raise InputError(f"--poses {poses} does not exist")
        clip = load_clip(poses)
    report = check_engine(engine, backend, ckpt=ckpt, device=device, num_frames=num_frames, height=height,
                          width=width, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          seed=seed, prompt=prompt, clip=clip)
    for line in format_report(report):
        click.echo(line)
    if not report["passed"]:
        sys.exit(1)

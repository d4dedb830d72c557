"""``fpengine export`` and ``fpengine check`` (registered on the main group in ``engine.cli.app``)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from finephys.errors import InputError

from engine.cli.common import PATH


def _range(option: str, text: str | None):
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(":"))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise InputError(f"{option} {text}: expected MIN:OPT:MAX, three integers")
    return values


@click.command("export")
@click.option("--ckpt", type=PATH, required=True, help="FinePhys checkpoint folder (fpengine init writes one).")
@click.option("--out", type=PATH, required=True, help="Engine directory to write.")
@click.option("--precision", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True,
              help="Weights and graphs (the pose stack stays fp32).")
@click.option("--frames", "frames", default=None, metavar="MIN:OPT:MAX", help="Frames the engine accepts (default 1:model:motion window).")
@click.option("--height", "height", default=None, metavar="MIN:OPT:MAX", help="Video heights (multiples of 8; default half..twice the model's).")
@click.option("--width", "width", default=None, metavar="MIN:OPT:MAX", help="Video widths (multiples of 8).")
@click.option("--no-check", is_flag=True, help="Skip the parity check against the reference.")
@click.option("--force", is_flag=True, help="Rebuild every stage, even those that are up to date.")
@click.option("--overwrite", is_flag=True, help="Replace an existing directory that is not this checkpoint's engine.")
def export(ckpt, out, precision, frames, height, width, no_check, force, overwrite):
    """Turn a checkpoint into an engine directory: fp16 weights with the LoRA merged, ONNX graphs,
    TensorRT plans where TensorRT is installed, a manifest and a parity report."""
    from dataclasses import replace

    from engine.check import export_parity
    from export.build import export_engine
    from export.contract import ShapeProfile
    from finephys.model.checkpoint import read_manifest
    from finephys.model.config import FinePhysConfig

    if not Path(ckpt).exists():
        raise InputError(f"--ckpt {ckpt} does not exist")
    ranges = {k: _range(f"--{k}", v) for k, v in (("frames", frames), ("height", height), ("width", width))}
    profile = None
    if any(ranges.values()):
        cfg = FinePhysConfig.from_dict(read_manifest(ckpt)["config"])
        profile = replace(ShapeProfile.default(cfg), **{k: v for k, v in ranges.items() if v})
    from engine.cli.common import terminate_as_interrupt

    with terminate_as_interrupt():  # SIGTERM cleans up like Ctrl-C: the temporary directory goes
        manifest = export_engine(ckpt, out, precision=precision, profile=profile, overwrite=overwrite, force=force,
                                 check=None if no_check else export_parity, log=lambda line: click.echo(line, err=True))
    size = sum(e["bytes"] for e in manifest["files"].values()) / 2**20
    click.echo(f"wrote {out}: {manifest['precision']} engine, {len(manifest['files'])} files, {size:.1f} MiB", err=True)


@click.command("check")
@click.option("--engine", type=PATH, required=True, help="Engine directory (fpengine export writes one).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt", "triton"]), default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--ckpt", type=PATH, default=None, help="The source checkpoint (default: the path in the manifest).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option("--poses", type=PATH, default=None, help="Pose clip (default: a built-in walking clip).")
@click.option("--prompt", default="a person walking", show_default=True)
@click.option("--frames", "num_frames", type=int, default=4, show_default=True)
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

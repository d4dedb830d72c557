"""The ``fpengine`` command line."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from finephys.errors import InputError

from engine.cli.common import PATH, DeviceChoice, SectionedCommand, StopAtStep, existing, fail
from engine.cli.detect import DETECT_OPTION_NAMES, detect, detect_options, generate_input
from engine.options import prompt_options, sampler_options


class _Group(click.Group):
    """Bad input becomes one line on stderr and exit status 2, never a traceback; so do click's
    own errors on a command's options (an unknown option, a value not of its type or choices),
    and a file the system would not read or write (no permission, a full disk) that no check
    before the work could foresee."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as exc:
            fail(str(exc))
        except click.UsageError as exc:
            fail(" ".join(exc.format_message().split()))
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            fail(f"{where}{exc.strerror or exc}")
        except KeyboardInterrupt:
            fail("interrupted")
        except Exception as exc:
            safetensors = sys.modules.get("safetensors")
            if safetensors is None or not isinstance(exc, safetensors.SafetensorError):
                raise
            fail(f"a .safetensors file could not be written or read: {_os_message(str(exc))}")


def _os_message(text: str) -> str:
    """A safetensors error without its wrapping ("Error while serializing: I/O error: No space left
    on device (os error 28)" -> "No space left on device (os error 28)")."""
    import re

    return re.sub(r"^Error while [a-z ]+: (I/O error: )?", "", text)


@click.group(cls=_Group)
@click.version_option(package_name="fpengine")
def main():
    """fpengine: fast inference for FinePhys pose-guided human action video generation."""


_FINISHED: set[str] = set()  # commands that ran to the end in this process, every output closed


def run() -> None:
    """The ``fpengine`` console script: ``main``; after a ``generate`` that ran to the end, a quick
    exit that skips the interpreter's teardown (the GPU allocator freeing its segments one by one,
    every module torn down: 0.25 s of a 7.6 s start-up on an H100). Its outputs are closed and its
    model freed by then; any other ending (an error, an interrupt, another command) exits as usual."""
    try:
        main()
    except SystemExit as exc:
        if "generate" in _FINISHED and exc.code in (None, 0):
            import contextlib
            import os

            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say there
                    stream.flush()
            os._exit(0)
        raise


@main.command(cls=SectionedCommand, sections=[
    ("Input (one of)", ("poses", "video")),
    ("With --video: pose detection (as `fpengine detect`)", (*DETECT_OPTION_NAMES, "save_clip"))])
@click.option("--poses", "poses", type=PATH, default=None, help="Pose clip (clip.npz v1); or --video.")
@click.option("--video", type=PATH, default=None,
              help="Reference video: detect its poses first (the detection options below).")
@detect_options
@click.option("--save-clip", type=PATH, default=None, help="With --video: write the detected clip.npz.")
@prompt_options
@click.option("--ckpt", type=PATH, default=None, help="FinePhys checkpoint folder (default: embedded demo model).")
@click.option("--engine", type=PATH, default=None, help="Engine directory from `fpengine export` (instead of --ckpt).")
@click.option("--backend", type=click.Choice(["auto", "reference", "onnxruntime", "tensorrt", "triton"]), default="auto",
              show_default=True, help="auto: the engine's fastest backend here with --engine, else reference.")
@click.option("--device", type=DeviceChoice(), default="auto", show_default=True,
              help="Where to run: auto (CUDA where there is a GPU, else the CPU), cpu, cuda or cuda:N.")
@sampler_options
@click.option("--out", type=PATH, default=None, help="Video (.mp4), written as frames become final.")
@click.option("--frames-dir", type=PATH, default=None, help="Folder for PNG frames, written as they become final.")
@click.option("--save-poses", type=PATH, default=None, help="Write every pose stage to this .npz.")
@click.option("--preview", type=PATH, default=None, help="Render input and projected skeletons to this .mp4.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option("--parallel", type=click.Choice(["guidance", "windows", "both"]), default=None,
              help="Split the clip over processes: guidance halves (2), windows (2+), or both (4, 6, ...).")
@click.option("--gpus", type=int, default=None,
              help="With --parallel: processes, one per GPU (CPU with gloo where too few); default 2 (or torchrun's).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None, metavar="N",
              help="Most frames x height x width per window (default 16 x 1024 x 1024); larger runs are refused "
                   "before any work, with what would fit.")
@click.option("--require-compiled", is_flag=True,
              help="With --engine on the triton backend: fail unless the engine carries this run's compiled UNet "
                   "steps (fpengine export --compile), instead of compiling just in time.")
def generate(poses, prompt, negative_prompt, ckpt, engine, backend, device, num_frames, height, width,
             num_inference_steps, guidance_scale, seed, context_length, context_stride, out, frames_dir,
             save_poses, preview, overwrite, deep_cache=1, deep_cache_depth=1, video=None, save_clip=None, parallel=None,
             gpus=None, require_compiled=False, max_pixels=None, **detect_kw):
    """Generate a video of a person moving as the pose clip shows (any length, streamed).

    With --video instead of --poses, the poses are detected first (see `fpengine detect`).
    """
    from engine.load import check_options, load_model
    from finephys.sampler.options import GenerateOptions
    from finephys.sampler.stream import generate_stream
    from engine.outputs import GenerateOutputs, check_distinct, check_output

    if parallel is None and gpus is not None:
        raise InputError("--gpus goes with --parallel")
    if parallel is not None:  # under torchrun, ranks > 0 take their job from rank 0 and exit here
        from engine.cli.parallel import cli_follower

        cli_follower(gpus, device)
    if out is None and frames_dir is None:
        raise InputError("generate: pass --out VIDEO.mp4 and/or --frames-dir DIR")
    check_output(out, overwrite, "--out", (".mp4",))
    check_output(frames_dir, overwrite, "--frames-dir", ())
    check_output(save_poses, overwrite, "--save-poses", (".npz",))
    check_output(preview, overwrite, "--preview", (".mp4",))
    check_output(save_clip, overwrite, "--save-clip", (".npz",))
    check_distinct({"--out": out, "--frames-dir": frames_dir, "--save-poses": save_poses, "--preview": preview,
                    "--poses": poses, "--video": video, "--save-clip": save_clip})
    if ckpt is not None:
        existing(ckpt, "--ckpt")
    opts = GenerateOptions(prompt, negative_prompt, num_frames, height, width, num_inference_steps,
                           guidance_scale, seed, context_length, context_stride, deep_cache, deep_cache_depth)
    if max_pixels is not None:
        opts = dataclasses.replace(opts, max_pixels=max_pixels)
    if parallel is not None and deep_cache != 1:
        raise InputError("--deep-cache: not with --parallel (each process runs the full UNet)")
    if require_compiled and (engine is None or parallel is not None):
        raise InputError("--require-compiled goes with --engine, without --parallel")
    if video is not None and (ckpt is None or engine is None):  # what needs no clip, before detection
        check_options(None, opts, ckpt, engine)
    clip, detected = generate_input(poses, video, save_clip, detect_kw)
    outputs = GenerateOutputs(out, frames_dir, save_poses, preview, overwrite, detected)
    if ckpt is None or engine is None:  # both: load_model says which to drop
        p = check_options(clip, opts, ckpt, engine, require_compiled, backend)  # before any weights load
        if parallel is not None and p is not None:
            from engine.distributed import check_guidance_split

            check_guidance_split(parallel, p.guidance)
    if save_clip is not None:  # only once every check has passed
        from finephys.poses.clip import save_clip as write_clip

        write_clip(clip, save_clip, overwrite=overwrite)
    if parallel is not None:
        from engine.cli.parallel import CliJob, cli_generate

        return cli_generate(CliJob(parallel, opts, clip, ckpt, engine, backend, outputs), gpus, device)
    model = load_model(ckpt, device=device, engine=engine, backend=backend, require_compiled=require_compiled)
    stop = StopAtStep()
    stream = generate_stream(model, clip, opts, should_stop=stop)
    log = lambda line: click.echo(line, err=True)  # noqa: E731
    outputs.write_poses(stream, log)
    with stop.installed():
        _, interrupted = outputs.write_frames(stream, stream, log)
    if interrupted:
        sys.exit(130)
    _FINISHED.add("generate")


@main.command()
@click.option("--poses", "poses", type=PATH, required=True, help="Pose clip (clip.npz v1).")
@click.option("--ckpt", type=PATH, default=None, help="FinePhys checkpoint folder (default: embedded demo model).")
@click.option("--out", type=PATH, required=True, help="Pose stages .npz.")
@click.option("--preview", type=PATH, default=None, help="Render input and projected skeletons to this .mp4.")
@click.option("--overwrite", is_flag=True)
def poses(poses, ckpt, out, preview, overwrite):
    """Run the pose stack alone (lift, physics, fuse, project) and save every stage."""
    from finephys.poses.clip import load_clip
    from finephys.sampler.poses import prepare_clip, run_pose_stack

    from engine.load import load_pose_model
    from engine.outputs import check_distinct, check_output, save_npz, write_pose_preview

    check_output(out, overwrite, "--out", (".npz",))
    check_output(preview, overwrite, "--preview", (".mp4",))
    check_distinct({"--out": out, "--preview": preview, "--poses": poses})
    clip = load_clip(existing(poses, "--poses"))
    model = load_pose_model(None if ckpt is None else existing(ckpt, "--ckpt"))  # the pose stack only
    clip, notes = prepare_clip(clip, model)
    for note in notes:
        click.echo(note, err=True)
    stages = run_pose_stack(model, clip)
    save_npz(out, stages.to_npz_dict())
    if preview is not None:
        write_pose_preview(stages, preview, overwrite)
    click.echo(f"wrote {out}: {stages.s_fused.shape[0]} frames", err=True)


@main.command()
@click.argument("out", type=PATH)
@click.option("--demo", is_flag=True, help="Write the small trained demo model.")
@click.option("--untrained", is_flag=True, help="With --demo: seeded-random generator weights (the start of `fpengine train`).")
@click.option("--vae-scale-factor", type=click.Choice(["4", "8"]), default=None,
              help="With --demo --untrained: pixels per latent pixel (the demo's 4; 8 as in SD 1.5 and its stages 1-7).")
@click.option("--base", type=PATH, default=None, help="SD 1.5: a diffusers folder or a single .safetensors/.ckpt.")
@click.option("--motion-module", type=PATH, default=None, help="AnimateDiff motion module (.ckpt/.safetensors).")
@click.option("--lora", type=PATH, default=None, help="LoRA file (diffusers or kohya keys).")
@click.option("--pose-weights", type=PATH, default=None, help="Pose-stack weights from `fpengine train-pose`.")
@click.option("--overwrite", is_flag=True)
def init(out, demo, untrained, vae_scale_factor, base, motion_module, lora, pose_weights, overwrite):
    """Compose a FinePhys checkpoint folder OUT (from public parts, or --demo)."""
    import tempfile

    from finephys.files import check_new_path
    from finephys.model.checkpoint import save_checkpoint
    from finephys.model.compose import compose, tokenizer_source
    from finephys.model.demo import make_demo_parts
    from finephys.model.text import write_clip_tokenizer

    if demo == (base is not None) or (base is None) != (motion_module is None):
        raise InputError("init: pass either --demo, or --base and --motion-module")
    if untrained and not demo:
        raise InputError("init: --untrained goes with --demo")
    if vae_scale_factor is not None and not untrained:
        raise InputError("init: --vae-scale-factor goes with --demo --untrained (the trained demo's is fixed)")
    if demo and (lora is not None or pose_weights is not None):
        raise InputError("init: --lora and --pose-weights go with --base, not --demo")
    check_new_path(out, overwrite, "--out", folder=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp)
        if demo:
            write_clip_tokenizer(tok)
            parts = make_demo_parts(tok, trained=not untrained, **(
                {"vae_scale_factor": int(vae_scale_factor)} if vae_scale_factor else {}))
        else:
            tok = tokenizer_source(base) or (write_clip_tokenizer(tok) or tok)
            parts = compose(base, motion_module, tok, lora=lora, pose_weights=pose_weights)
        save_checkpoint(parts, out, tok, overwrite=overwrite)
    click.echo(f"wrote the {'demo ' if demo else ''}checkpoint to {out}", err=True)


main.add_command(detect)

from engine.cli.export import check as _check_command, export as _export_command  # noqa: E402

main.add_command(_export_command)
main.add_command(_check_command)

from engine.cli.pose import eval_pose_cmd, train_pose_cmd  # noqa: E402

main.add_command(train_pose_cmd)
main.add_command(eval_pose_cmd)

from engine.cli.train import train_cmd, train_judge_cmd  # noqa: E402

main.add_command(train_cmd)
main.add_command(train_judge_cmd)

from engine.cli.eval_video import eval_video_cmd  # noqa: E402

main.add_command(eval_video_cmd)

from engine.cli.serve import serve as _serve_command  # noqa: E402

main.add_command(_serve_command)


if __name__ == "__main__":  # python -m engine.cli.app (same as python -m engine / fpengine)
    main()

"""``fpengine train``: train FinePhys guidance (registered on ``engine.cli.app.main``)."""
from __future__ import annotations

import math
from pathlib import Path

import click

from finephys.errors import InputError

from engine.cli.common import PATH


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA GPU here, expected cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise InputError(f"--device {name!r}: expected cpu, cuda or auto")
    return name


@click.command("train")
@click.option("--ckpt", type=PATH, required=True, help="FinePhys checkpoint to start from (fpengine init).")
@click.option("--data", required=True,
              help="render:MOTION[,MOTION...] (figures drawn from motion capture) or a folder of NAME.mp4 + "
                   "NAME.npz (its clip, from fpengine detect) + NAME.txt (its caption).")
@click.option("--hold-out", "held_out", type=PATH, multiple=True,
              help="Motion never trained on (with render:), only validated on. Repeatable.")
@click.option("--out", type=PATH, required=True, help="Checkpoint folder to write (training state: OUT.training/).")
@click.option("--train", "train", default="encoder,lora", show_default=True,
              help="What to train: 'all' or a comma-separated subset of encoder, lora, unet, text_encoder, vae "
                   "(or vae_decoder: the VAE's decoder alone, keeping its latent space).")
@click.option("--steps", type=int, default=None, help="Diffusion training steps  [default: 1000; 2 with --smoke]")
@click.option("--vae-steps", type=int, default=0, show_default=True, help="VAE steps first (with the vae trained).")
@click.option("--vae-from", type=PATH, default=None,
              help="Take the VAE (and its latent scaling) from this checkpoint instead of --ckpt's.")
@click.option("--vae-batch-size", type=int, default=48, show_default=True, help="Frames per VAE step.")
@click.option("--vae-figure-weight", type=float, default=0.0, show_default=True,
              help="Extra weight of the pixels near the figure's skeleton in the VAE loss (small figures "
                   "otherwise lose their limbs to the background).")
@click.option("--figure-weight", type=float, default=0.0, show_default=True,
              help="Extra weight of the latent pixels near the figure's skeleton in the diffusion loss "
                   "(the figure is a few percent of the frame; validation stays unweighted).")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Clips per step.")
@click.option("--frames", type=int, default=None, help="Frames per clip (default: the model's).")
@click.option("--height", type=int, default=None, help="Video height (default: the model's).")
@click.option("--width", type=int, default=None, help="Video width (default: the model's).")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True,
              help="After the warm-up: constant (the EMA averages), or cosine down to 0 at --steps.")
@click.option("--lora-rank", type=int, default=None, help="Rank of a new LoRA (default: the checkpoint's, else 64).")
@click.option("--pose-stack/--no-pose-stack", default=False, show_default=True,
              help="Guide with the pose stack's projection of the 2D (as inference does) instead of the 2D itself.")
@click.option("--mixed-precision", "precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32",
              show_default=True, help="Autocast on a GPU (fp32 weights).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--checkpoint-every", type=int, default=500, show_default=True)
@click.option("--val-every", type=int, default=100, show_default=True)
@click.option("--time-limit", type=float, default=None, help="Minutes for this call; the state is saved, --resume goes on.")
@click.option("--resume", is_flag=True, help="Continue the run whose state is in OUT.training/.")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the UNet for the training steps (GPU; falls back to eager if it fails).")
@click.option("--smoke", is_flag=True,
              help="CPU smoke test: 2 steps of 1 clip of 4 frames at 64x64 (options given keep their values).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option("--overwrite", is_flag=True, help="Replace OUT and start a new training state.")
def train_cmd(ckpt, data, held_out, out, train, steps, vae_steps, vae_from, vae_batch_size, vae_figure_weight, figure_weight, batch_size, frames, height, width, lr, lr_schedule, lora_rank, pose_stack,
              precision, seed, checkpoint_every, val_every, time_limit, compile_, resume, smoke, device, overwrite):
    """Train the heatmap encoder + a LoRA (or every module of a small model) with the DDPM loss."""
    from finephys.model.checkpoint import read_config, read_manifest
    from finephys.sampler.options import MAX_PIXELS, check_video_size
    from finephys.model.text import load_tokenizer
    from finephys.training.train import GenTrainOptions, Trainer, check_run
    from finephys.training.train_data import open_source

    modules = ("encoder", "lora", "unet", "text_encoder", "vae") if train == "all" else \
        tuple(m.strip() for m in train.split(",") if m.strip())
    if smoke:  # small sizes, in place of the defaults only: options given keep their values
        given = click.get_current_context().get_parameter_source
        small = dict(batch_size=1, frames=4, height=64, width=64, device="cpu", vae_batch_size=4,
                     vae_steps=2 if {"vae", "vae_decoder"} & set(modules) else 0)
        values = dict(batch_size=batch_size, frames=frames, height=height, width=width, device=device,
                      vae_batch_size=vae_batch_size, vae_steps=vae_steps)
        values = {k: small[k] if given(k) == click.core.ParameterSource.DEFAULT else v for k, v in values.items()}
        batch_size, frames, height, width, device, vae_batch_size, vae_steps = values.values()
        steps = 2 if steps is None else steps
    steps = 1000 if steps is None else steps
    opts = GenTrainOptions(train=modules, steps=steps, vae_steps=vae_steps, vae_batch_size=vae_batch_size,
                           vae_figure_weight=vae_figure_weight, figure_weight=figure_weight, vae_from=str(vae_from) if vae_from else None,
                           batch_size=batch_size, frames=frames,
                           height=height, width=width, lr=lr, lr_schedule=lr_schedule, lora_rank=lora_rank, pose_stack=pose_stack,
                           precision=precision, seed=seed, checkpoint_every=checkpoint_every, val_every=val_every,
                           time_limit=time_limit, compile=compile_)
    opts.check()
    cfg = read_config(ckpt)
    if vae_from:
        read_manifest(vae_from)  # a checkpoint folder, checked before any work
    # the model's sizes only where none was given: 0 is refused below, not taken as the default
    size = (cfg.height if height is None else height, cfg.width if width is None else width)
    check_video_size(*size)
    frames = cfg.num_frames if frames is None else frames
    if frames < 3:
        raise InputError(f"--frames {frames}: expected at least 3")
    if frames > cfg.max_frames:
        raise InputError(f"--frames {frames}: expected at most the motion modules' {cfg.max_frames}")
    pixels = frames * size[0] * size[1]
    if pixels > MAX_PIXELS:
        raise InputError(f"--height {size[0]} --width {size[1]}: {frames} frames x "
                         f"{size[0]}x{size[1]} = {pixels:,} pixels per clip, expected at most {MAX_PIXELS:,} "
                         "(the largest window generate takes)")
    dev = _device(device)
    check_run(ckpt, out, opts, resume, overwrite)  # before the data, which may be videos to decode
    source = open_source(data, size, cfg.fps, frames, load_tokenizer(Path(ckpt) / "tokenizer"),
                         held_out=held_out)
    trainer = Trainer(ckpt, source, out, opts, device=dev, resume=resume, overwrite=overwrite)
    click.echo(f"training {','.join(modules)} of {ckpt} on {source.description}, {dev}", err=True)
    result = trainer.run()
    if result["done"]:
        click.echo(f"wrote {out}: a FinePhys checkpoint after {result['vae_step']} VAE + {result['step']} diffusion "
                   f"steps; loss curve {result['loss_png']}")
    else:
        click.echo(f"stopped at {result['vae_step']} VAE + {result['step']} diffusion steps (time limit); state in "
                   f"{result['state']}; run the same command with --resume to go on")


@click.command("train-judge")
@click.option("--data", required=True, help="render:MOTION[,MOTION...]: figures drawn from motion capture.")
@click.option("--hold-out", "held_out", type=PATH, multiple=True, help="Motion never trained on. Repeatable.")
@click.option("--out", type=PATH, required=True, help="ONNX file to write (input (1,3,128,128), COCO-17 heatmaps).")
@click.option("--steps", type=int, default=3000, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True, help="Clips of 8 frames per step.")
@click.option("--lr", type=float, default=2e-3, show_default=True, help="Peak learning rate (one cycle).")
@click.option("--width", type=int, default=32, show_default=True, help="Channels of the first level (x2, x4 below).")
@click.option("--depth", type=int, default=0, show_default=True,
              help="Residual blocks after each of the two lowest levels.")
@click.option("--time-limit", type=float, default=None,
              help="About this many minutes: as many of --steps as fit, timed on the first steps (the count is "
                   "printed; the export comes after).")
@click.option("--wide-colours", is_flag=True,
              help="Wider colour changes of the training crops: half of them turn their hues by any angle, "
                   "saturation 0.3-1.5x, each channel 0.8-1.2x (default: each channel 0.9-1.1x, as the shipped "
                   "judge was trained).")
@click.option("--eval-clips", type=int, default=64, show_default=True,
              help="Held-out windows (16 frames) the written judge is scored on, as eval-video runs it (0: none); "
                   "one window's PCK varies by about 0.06, so 16 windows leave a standard error near 0.016.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option("--overwrite", is_flag=True)
def train_judge_cmd(data, held_out, out, steps, batch_size, lr, width, depth, time_limit, wide_colours, eval_clips, seed,
                    device, overwrite):
    """Train the judge pose network that `eval-video` runs on the demo's figures."""
    from finephys.files import atomic_path
    from finephys.training.judge import SIZE, export_judge, train_judge

    from engine.outputs import check_output
    from finephys.training.train_data import RenderSource

    if not data.startswith("render:"):
        raise InputError(f"--data {data}: expected render:MOTION[,MOTION...]")
    # (least, most): a judge of 128x128 crops; more would only exhaust the memory
    for name, value, least, most in (("--steps", steps, 1, None), ("--batch-size", batch_size, 1, 4096),
                                     ("--width", width, 1, 512), ("--depth", depth, 0, 64),
                                     ("--eval-clips", eval_clips, 0, None)):
        if value < least:
            raise InputError(f"{name} {value}: expected >= {least}")
        if most is not None and value > most:
            raise InputError(f"{name} {value}: expected at most {most}")
    if not (math.isfinite(lr) and lr > 0):
        raise InputError(f"--lr {lr}: expected a number > 0")
    if time_limit is not None and not (math.isfinite(time_limit) and time_limit > 0):
        raise InputError(f"--time-limit {time_limit}: expected minutes > 0")
    check_output(out, overwrite, "--out", (".onnx",))
    dev = _device(device)
    paths = [p for p in data[len("render:"):].split(",") if p]
    source = RenderSource(paths, (SIZE, SIZE), 8.0, 8, held_out=held_out)
    net, losses = train_judge(source, steps, batch_size, lr, dev, seed, width=width, depth=depth,
                              time_limit=time_limit, wide_colours=wide_colours)
    with atomic_path(Path(out)) as tmp:
        export_judge(net, tmp)
    click.echo(f"wrote {out} after {len(losses)} steps (final loss {sum(losses[-50:]) / len(losses[-50:]):.3f})")
    if eval_clips:
        click.echo(judge_report(Path(out), RenderSource(paths, (SIZE, SIZE), 8.0, 16, held_out=held_out), eval_clips))


def judge_report(judge: Path, source, clips: int, seed: int = 0) -> str:
    """One line: ``judge`` scored by eval-video's measures on ``clips`` held-out renders of ``source``
    (seed 0: the windows benchmarks/video_quality.py draws for its ``judge`` row), PCK with its
    standard error over windows and split by the renders' background."""
    import numpy as np

    from engine.eval_video import evaluate, standard_error
    from finephys.training.scene import BACKGROUNDS

    rows, by_background = [], {}
    for frames, joints, caption in source.held_out_renders(clips, seed):
        rows.append(evaluate(frames, joints, 8.0, caption, pose_model=judge))
        background = next((k for k, v in BACKGROUNDS.items() if caption.endswith(v)), "other")
        by_background.setdefault(background, []).append(rows[-1]["pck"])
    mean = lambda k: float(np.mean([r[k] for r in rows if k in r]))  # noqa: E731
    se = standard_error([r["pck"] for r in rows])
    split = ", ".join(f"{k} {np.mean(v):.3f} ({len(v)})" for k, v in sorted(by_background.items()))
    return (f"held-out renders ({clips} windows of {source.val_frames} frames, seed {seed}): PCK@0.1 "
            f"{mean('pck'):.3f} (standard error {se:.3f}; by background: {split}), "
            f"joint error {mean('joint_error_px'):.2f} px, jitter {mean('jitter_px'):.2f} px "
            f"(the drawn joints' {mean('guide_jitter_px'):.2f})")

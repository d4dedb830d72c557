"""``fpengine train-pose`` and ``fpengine eval-pose``: train the pose stack (lifter + PhysNet)
on 3D motion and measure it on motion it did not see (registered on ``engine.cli.app.main``)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import click

from finephys.errors import InputError

from engine.cli.common import PATH
from finephys.files import write_json


def _pose_config(ckpt: Path | None):
    """(PoseConfig, fps) of a checkpoint folder, or of the embedded demo model."""
    if ckpt is None:
        from finephys.model.demo import demo_config

        cfg = demo_config()
    else:
        from finephys.model.checkpoint import read_config

        cfg = read_config(ckpt)
    return cfg.pose, cfg.fps


def _fuse_weight(text: str, fit: bool = True) -> float | str:
    """``--fuse-weight``: one weight in [0, 1], or (with ``fit``) 'fit'."""
    if fit and text == "fit":
        return text
    try:
        w = float(text)
    except ValueError:
        w = math.nan
    if not 0.0 <= w <= 1.0:
        expected = "'fit' or a number in [0, 1]" if fit else "a number in [0, 1] (fitting is train-pose's)"
        raise InputError(f"--fuse-weight: {text!r}, expected {expected}")
    return w


def _threads(n: int) -> None:
    import torch

    if n < 1:
        raise InputError(f"--threads: {n}, expected >= 1")
    torch.set_num_threads(n)


@click.command("train-pose")
@click.option("--motion", "motion", type=PATH, multiple=True, required=True,
              help="3D motion to train on: .bvh, .npz (joints3d (T,17,3) metres Y up + fps), a "
                   "Panoptic hdPose3d_stage1_coco19 folder, or a folder of these. Repeatable.")
@click.option("--val-motion", type=PATH, multiple=True,
              help="Motion held out entirely (validation only). Repeatable.")
@click.option("--hold-out", "hold_out", multiple=True, metavar="PATTERN",
              help="Hold out whole --motion sequences whose file name (without extension) matches this "
                   "glob pattern, e.g. '09_11' or '05_0[6-7]'. Repeatable.")
@click.option("--out", type=PATH, required=True, help="Weights file to write (.safetensors).")
@click.option("--curve", type=PATH, default=None, help="Loss curve PNG (default: OUT with .png).")
@click.option("--ckpt", type=PATH, default=None,
              help="Take the pose-stack sizes and fps from this checkpoint (default: the demo model's).")
@click.option("--epochs", type=int, default=40, show_default=True, help="Lifter epochs (stage 1).")
@click.option("--physnet-epochs", type=int, default=20, show_default=True,
              help="PhysNet epochs on the frozen lifter (stage 2).")
@click.option("--steps-per-epoch", type=int, default=50, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="Hold out the last fraction of every --motion sequence.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True,
              help="torch CPU threads (results are reproducible for a fixed seed and thread count).")
@click.option("--fuse-weight", "fuse_weight", default=None, metavar="fit|W",
              help="S_fused = w S_dd + (1 - w) S_pp: 'fit' fits one w per joint on training windows after "
                   "training; a number in [0, 1] sets one w for every joint (default: the model's, 0.5 for "
                   "the demo).")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_pose_cmd(motion, val_motion, hold_out, out, curve, ckpt, epochs, physnet_epochs, steps_per_epoch,
                   batch_size, val_fraction, seed, threads, fuse_weight, overwrite, quiet):
    """Train the pose stack (lifter + PhysNet) on 3D motion; write its weights."""
    from finephys.training.loss_plot import plot_history
    from finephys.training.pose_data import check_apart, find_motion, split_held_out
    from finephys.training.train_pose import TrainOptions, save_trained, train_pose

    from engine.outputs import check_distinct, check_output

    curve = out.with_suffix(".png") if curve is None else curve
    check_output(out, overwrite, "--out", (".safetensors",))
    check_output(curve, overwrite, "--curve", (".png",))
    check_distinct({"--out": out, "--curve": curve})
    _threads(threads)
    opts = TrainOptions(epochs=epochs, physnet_epochs=physnet_epochs, steps_per_epoch=steps_per_epoch,
                        batch_size=batch_size,
                        seed=seed, val_fraction=val_fraction)
    opts.check()  # before any motion is read
    fuse = None if fuse_weight is None else _fuse_weight(fuse_weight)
    pose_cfg, fps = _pose_config(ckpt)
    if fuse not in (None, "fit"):
        pose_cfg = dataclasses.replace(pose_cfg, fuse_weight=fuse)
    motions = find_motion(motion)
    motions, whole = split_held_out(motions, hold_out)
    val = find_motion(val_motion)
    check_apart(motions, val, "--val-motion")
    held_out = val + whole
    log = lambda msg: click.echo(msg, err=True)  # noqa: E731
    log(f"training on {len(motions)} sequences ({sum(m.duration for m in motions):.1f} s, last "
        f"{val_fraction:g} held out) + {len(held_out)} held-out sequences, {fps:g} fps")
    lifter, physnet, hist, info = train_pose(motions, pose_cfg, fps, opts, held_out,
                                             progress=not quiet, log=log, fit_fuse_weight=fuse == "fit")
    save_trained(out, lifter, physnet, pose_cfg, fps, info)
    plot_history(hist, curve)
    log(f"wrote {out} and {curve} ({info['seconds']:.0f} s)")


@click.command("eval-pose")
@click.option("--motion", "motion", type=PATH, multiple=True, required=True,
              help="3D motion to evaluate on (as train-pose --motion). Repeatable.")
@click.option("--weights", type=PATH, default=None,
              help="Pose weights from train-pose (default: the demo model's shipped ones).")
@click.option("--tail", type=float, default=1.0, show_default=True,
              help="Evaluate only the last fraction of every sequence (what train-pose "
                   "--val-fraction held out).")
@click.option("--framing", "framings", multiple=True, default=("medium",), show_default=True,
              help="Camera framing: medium (person 500 px tall, centred, 1920x1080, focal 1 x width), "
                   "small (240 px), tiny (100 px), large (1000 px in 3840x2160, focal 1.5 x width), "
                   "off-centre (400 px, focal 0.6 x width, pelvis path at 15%/30% of the width/height) "
                   "or legacy (the old protocol: 1000 px image and focal, 4 m). Repeatable.")
@click.option("--phases", type=int, default=4, show_default=True, help="Temporal phase offsets per clip.")
@click.option("--cameras", type=int, default=4, show_default=True, help="Camera views per clip.")
@click.option("--noise-px", "noises", type=float, multiple=True, default=(2.0,), show_default=True,
              help="2D noise sigma, pixels per 1000 px of person height (legacy framing: pixels). "
                   "Repeatable.")
@click.option("--drop", type=float, default=0.0, show_default=True, help="Fraction of joints given score 0.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--fuse-weight", "fuse_weight", default=None, metavar="W",
              help="Evaluate with one fusion weight w in [0, 1] for every joint instead of the weights file's.")
@click.option("--json", "json_out", type=PATH, default=None, help="Also write the numbers as JSON.")
@click.option("--overwrite", is_flag=True)
def eval_pose_cmd(motion, weights, tail, framings, phases, cameras, noises, drop, seed, threads, fuse_weight,
                  json_out, overwrite):
    """Per clip, grouped by action class, in every framing and at every noise level: MPJPE of
    S_dd / S_pp / S_fused, jitter, bone-length std, 2D reprojection error, foot skating and
    ground penetration."""
    from finephys.training.pose_data import find_motion
    from finephys.training.pose_metrics import (FRAMINGS, check_lengths, check_tail, class_means, evaluate,
                                                format_report, get_framing, too_short)
    from finephys.model.pose_weights import DEMO_WEIGHTS, load_pose_stack

    from engine.outputs import check_output

    if json_out is not None:
        check_output(json_out, overwrite, "--json", (".json",))
    framings = tuple(dict.fromkeys(framings))
    noises = tuple(dict.fromkeys(noises))
    for name in framings:
        get_framing(name)
    for name, value, most in (("--phases", phases, 64), ("--cameras", cameras, 64)):
        if not 1 <= value <= most:
            raise InputError(f"{name}: {value}, expected 1..{most}")
    for noise in noises:
        if not (math.isfinite(noise) and noise >= 0):
            raise InputError(f"--noise-px: {noise:g}, expected a finite sigma >= 0 (pixels per 1000 px of "
                             f"person height)")
    if not 0 <= drop < 1:
        raise InputError(f"--drop: {drop:g}, expected a fraction in [0, 1)")
    check_tail(tail)
    fixed = None if fuse_weight is None else _fuse_weight(fuse_weight, fit=False)
    _threads(threads)
    if weights is not None and weights.is_dir():
        raise InputError(f"--weights {weights}: is a folder, expected a pose weights file (.safetensors from "
                         f"fpengine train-pose)")
    lifter, physnet, meta = load_pose_stack(DEMO_WEIGHTS if weights is None else weights)
    motions = find_motion(motion)
    if fixed is not None:
        meta["fuse_weight"] = fixed
    short = {id(m): too_short(m, meta["fps"], tail, phases) for m in motions}
    if len(motions) > 1 and not all(short.values()):  # of several, the ones too short are left out
        for m in motions:
            if short[id(m)]:
                click.echo(f"skipped {short[id(m)]}", err=True)
        motions = [m for m in motions if not short[id(m)]]
    check_lengths(motions, meta["fps"], tail, phases)
    runs = []
    for framing in framings:
        for noise in noises:
            results = evaluate(lifter, physnet, motions, meta["fps"], meta["fuse_weight"], tail, phases,
                               cameras, noise, drop, seed, framing)
            click.echo(("\n\n" if runs else "") + format_report(results))
            runs.append((results, class_means(results)))
    if json_out is not None:
        fw = meta["fuse_weight"]
        write_json(json_out, {"weights": str(weights or DEMO_WEIGHTS), "fps": meta["fps"],
                             "fuse_weight": list(fw) if isinstance(fw, tuple) else fw,
                             "tail": tail, "phases": phases, "cameras": cameras, "framings":
                             {f: FRAMINGS[f].describe() for f in framings}, "noise_px": list(noises),
                             "drop": drop, "seed": seed,
                             "clips": [r.to_dict() for results, _ in runs for r in results],
                             "means": [r.to_dict() for _, means in runs for r in means]})

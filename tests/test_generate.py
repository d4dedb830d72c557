import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from finephys.errors import InputError
import torch
from click.testing import CliRunner

from engine.cli.app import main
from engine.load import load_model
from finephys.sampler.options import GenerateOptions
from finephys.sampler.stream import generate
from engine.video import read_video

SMALL = ["--frames", "4", "--height", "64", "--width", "96", "--steps", "2"]


@pytest.fixture(scope="module")
def demo_model():
    return load_model(None)


def test_generate_frames_and_determinism(demo_model, walk_clip):
    opts = GenerateOptions("a person walking", num_frames=5, height=64, width=96, num_inference_steps=2, seed=3)
    a = generate(demo_model, walk_clip, opts, progress=False)
    b = generate(demo_model, walk_clip, opts, progress=False)
    c = generate(demo_model, walk_clip, GenerateOptions(**{**opts.__dict__, "seed": 4}), progress=False)
    assert a.frames.shape == (5, 64, 96, 3) and a.frames.dtype == np.uint8
    assert np.array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, c.frames)


def test_deep_cache_is_off_by_default_and_approximates_the_full_steps(demo_model, walk_clip):
    """--deep-cache 1 is the plain sampler; interval 2 and 3 change the result, less than another seed does."""
    base = dict(prompt="a person walking", num_frames=6, height=64, width=64, num_inference_steps=6, seed=3)
    full = generate(demo_model, walk_clip, GenerateOptions(**base), progress=False).latents
    off = generate(demo_model, walk_clip, GenerateOptions(**base, deep_cache=1), progress=False).latents
    assert torch.equal(full, off)
    other_seed = (generate(demo_model, walk_clip, GenerateOptions(**{**base, "seed": 4}), progress=False).latents
                  - full).abs().mean()
    for interval, depth in [(2, 1), (3, 2)]:
        opts = GenerateOptions(**base, deep_cache=interval, deep_cache_depth=depth)
        cached = generate(demo_model, walk_clip, opts, progress=False).latents
        diff = (cached - full).abs().mean()
        assert 0 < diff < 0.5 * other_seed, (interval, depth, diff, other_seed)


def test_cli_generate_writes_video_poses_and_preview(tmp_path, demo_ckpt):
    out, poses, prev = tmp_path / "v.mp4", tmp_path / "s.npz", tmp_path / "p.mp4"
    args = ["generate", "--poses", "examples/walk.npz", "--prompt", "a person walking", "--ckpt", str(demo_ckpt),
            "--out", str(out), "--save-poses", str(poses), "--preview", str(prev), *SMALL]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert read_video(out).shape == (4, 64, 96, 3)
    stages = np.load(poses, allow_pickle=False)
    assert stages["s_fused"].shape == (24, 17, 3) and stages["projected_2d"].shape == (24, 17, 2)
    # the guiding joints in the video's pixels: the 256x256 clip's projection scaled to 96x64
    np.testing.assert_allclose(stages["video_2d"], stages["projected_2d"][:4] * [96 / 256, 64 / 256], rtol=1e-6)
    assert read_video(prev).shape[0] == 24
    r = CliRunner().invoke(main, args)  # outputs exist now
    assert r.exit_code == 2 and "already exists" in r.output and "--overwrite" in r.output


@pytest.mark.parametrize("from_ckpt", [False, True])
def test_cli_poses_runs_the_pose_stack_alone(tmp_path, monkeypatch, demo_model, demo_ckpt, walk_clip, from_ckpt):
    """The stages of `generate`'s pose stack, without building the generator (it was 16 s of 16.3)."""
    import finephys.model.assembly

    from finephys.sampler.poses import prepare_clip, run_pose_stack

    want = run_pose_stack(demo_model, prepare_clip(walk_clip, demo_model)[0])

    def no_generator(*a, **k):
        raise AssertionError("fpengine poses built a generator")

    monkeypatch.setattr(finephys.model.assembly, "build_unet", no_generator)  # what new_parts builds the UNet with
    extra = ["--ckpt", str(demo_ckpt)] if from_ckpt else []
    r = CliRunner().invoke(main, ["poses", "--poses", "examples/walk.npz", "--out", str(tmp_path / "s.npz"), *extra])
    assert r.exit_code == 0, r.output
    got = np.load(tmp_path / "s.npz")
    assert got["s_dd"].shape == (24, 17, 3)
    for key in ("s_dd", "s_pp", "s_fused", "projected_2d"):
        np.testing.assert_array_equal(got[key], getattr(want, key), err_msg=key)


def _bad_clip(tmp_path, **change):
    base = dict(np.load("examples/walk.npz", allow_pickle=False))
    base.update(change)
    for k in [k for k, v in change.items() if v is None]:
        del base[k]
    path = tmp_path / "bad.npz"
    np.savez(path, **base)
    return str(path)


@pytest.mark.parametrize("change,words", [
    (dict(scores=None), "scores"),
    (dict(layout=np.asarray("coco18")), "layout"),
    (dict(image_size=None), "image_size"),
    ("nan", "NaN"),
    ("wide", "17"),
    ("short", "3 frames"),
    ("zeros", "scores"),
    ("range", "[0"),
])
def test_cli_bad_clips_one_line(tmp_path, change, words):
    kp = np.load("examples/walk.npz")["keypoints"]
    sc = np.load("examples/walk.npz")["scores"]
    if change == "nan":
        kp = kp.copy(); kp[2, 3, 0] = np.nan; change = dict(keypoints=kp)
    elif change == "wide":
        change = dict(keypoints=np.concatenate([kp, kp[:, :1]], 1), scores=np.concatenate([sc, sc[:, :1]], 1))
    elif change == "short":
        change = dict(keypoints=kp[:2], scores=sc[:2])
    elif change == "zeros":
        change = dict(scores=np.zeros_like(sc))
    elif change == "range":
        sc = sc.copy(); sc[0, 0] = 1.5; change = dict(scores=sc)
    out = tmp_path / "v.mp4"
    r = CliRunner().invoke(main, ["generate", "--poses", _bad_clip(tmp_path, **change), "--prompt", "x", "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert words.lower() in r.output.lower(), r.output
    assert r.output.strip().count("\n") == 0 and "Traceback" not in r.output
    assert not out.exists() and not list(tmp_path.glob(".v*"))


@pytest.mark.parametrize("extra,words", [
    (["--height", "60"], "--height 60: expected a positive multiple of 8"),
    (["--out", "nodir/v.mp4"], "does not exist"),
    (["--frames", "40"], "frames"),
    (["--ckpt", "nope"], "does not exist"),
    (["--ckpt", "examples/walk.npz"], "examples/walk.npz: is a file, expected a FinePhys checkpoint folder"),
    (["--poses", "missing.npz"], "does not exist"),
    (["--poses", "examples"], "examples: is a folder, expected a clip.npz file"),
    (["--deep-cache", "0"], "--deep-cache 0: expected 1 (off)"),
    (["--deep-cache", "2", "--deep-cache-depth", "9"], "--deep-cache-depth 9: expected 1..2"),
    (["--deep-cache", "2", "--parallel", "guidance"], "--deep-cache: not with --parallel"),
])
def test_cli_bad_options(tmp_path, extra, words):
    args = ["generate", "--poses", "examples/walk.npz", "--prompt", "x", "--out", str(tmp_path / "v.mp4"), *extra]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output


def test_cli_bad_checkpoint_weights(tmp_path, demo_ckpt):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(demo_ckpt, ck)
    (ck / "unet/diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 10)
    r = CliRunner().invoke(main, ["generate", "--poses", "examples/walk.npz", "--prompt", "x", "--ckpt", str(ck),
                                  "--out", str(tmp_path / "v.mp4")])
    assert r.exit_code == 2 and "unet" in r.output and not (tmp_path / "v.mp4").exists(), r.output


def test_long_prompt_warns_and_runs(tmp_path, caplog):
    r = CliRunner().invoke(main, ["generate", "--poses", "examples/walk.npz", "--prompt", "jump " * 90,
                                  "--out", str(tmp_path / "v.mp4"), *SMALL])
    assert r.exit_code == 0, r.output
    # 90 words + start and end tokens: the last 15 words do not fit in CLIP's 77 tokens; the line stays short
    warned = [rec.getMessage() for rec in caplog.records if "longer than 77 CLIP tokens" in rec.getMessage()]
    assert warned == ["A prompt ('" + "jump " * 7 + "ju...') is longer than 77 CLIP tokens; 15 tokens were cut: '"
                      + "jump " * 11 + "ju...'"], warned


@pytest.mark.slow
def test_real_subprocess(tmp_path):
    out = tmp_path / "v.mp4"
    cmd = [sys.executable, "-m", "engine", "generate", "--poses", "examples/walk.npz", "--prompt", "a walk",
           "--out", str(out), *SMALL]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert read_video(out).shape == (4, 64, 96, 3)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().startswith("error:") and "Traceback" not in p.stderr


def test_the_console_script_exits_at_once_only_after_a_generate_that_ran_to_the_end(monkeypatch):
    """``run`` skips the interpreter's teardown (os._exit) after a finished generate; an error, an
    interrupt or another command exits through SystemExit as before."""
    import os

    import engine.cli.app as app

    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)

    def command(code, finished):
        def fake_main():
            if finished:
                app._FINISHED.add("generate")
            sys.exit(code)
        return fake_main

    for code, finished, quick in ((0, True, [0]), (None, True, [0]), (0, False, []), (2, True, []), (130, False, [])):
        exits.clear()
        monkeypatch.setattr(app, "_FINISHED", set())
        monkeypatch.setattr(app, "main", command(code, finished))
        with pytest.raises(SystemExit) as e:  # os._exit is stubbed: the SystemExit follows it here
            app.run()
        assert e.value.code == code and exits == quick, (code, finished)


def test_a_frame_whose_joints_lie_at_one_point_is_treated_as_undetected(demo_model, walk_clip, tmp_path):
    """A detector's placeholder frame (every joint at one point) made the camera fit singular and
    `generate`, `poses` and `check` died with a traceback; it now counts as an undetected frame,
    with a note, and a clip of nothing else is refused in one line."""
    import dataclasses

    from finephys.sampler.poses import prepare_clip, run_pose_stack

    kp = walk_clip.keypoints.copy()
    kp[5] = (100.0, 100.0)
    clip, notes = prepare_clip(dataclasses.replace(walk_clip, keypoints=kp), demo_model)
    assert notes == ["frame 5: every visible joint at one point; treated as undetected"]
    sc = walk_clip.scores.copy()
    sc[5] = 0
    undetected, _ = prepare_clip(dataclasses.replace(walk_clip, scores=sc), demo_model)
    assert np.array_equal(clip.scores, undetected.scores)
    got, want = run_pose_stack(demo_model, clip), run_pose_stack(demo_model, undetected)
    np.testing.assert_array_equal(got.s_fused, want.s_fused)
    zeros = _bad_clip(tmp_path, keypoints=np.zeros_like(walk_clip.keypoints))
    r = CliRunner().invoke(main, ["poses", "--poses", str(zeros), "--out", str(tmp_path / "s.npz")])
    assert r.exit_code == 2 and not (tmp_path / "s.npz").exists()
    assert r.output.strip().splitlines() == ["error: clip: every frame's visible joints lie at one point (frame 0: "
                                             "[0. 0.]), expected a skeleton (an undetected frame has scores 0)"]


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    """PNG frames: the error names the frame's file, and no temporary file or empty folder stays.
    Weights (safetensors raises its own error type, not OSError): one line, not a traceback."""
    import safetensors.torch
    from PIL import Image

    def full(self, fp, *a, **k):
        Path(fp).write_bytes(b"part")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    args = ["generate", "--poses", "examples/walk.npz", "--prompt", "a walk", "--frames", "4", "--height", "32",
            "--width", "32", "--steps", "1", "--frames-dir", str(tmp_path / "fd")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'fd' / 'frame_00000.png'}: No space left on device")
    assert list(tmp_path.iterdir()) == []

    def no_space(*a, **k):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    import finephys.model.checkpoint

    monkeypatch.setattr(finephys.model.checkpoint, "save_file", no_space)
    r = CliRunner().invoke(main, ["init", "--demo", str(tmp_path / "ck")])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        "error: a .safetensors file could not be written or read: No space left on device (os error 28)"]
    assert list(tmp_path.iterdir()) == []


def test_a_single_window_ignores_its_stride_but_not_nonsense(demo_model, walk_clip):
    """A clip that fits one window never slides it: any positive stride is fine there (the check
    that refuses negative strides must not refuse these)."""
    from finephys.sampler.options import plan

    for length, stride in ((None, 16), (8, 8), (8, 100)):
        opts = GenerateOptions("a walk", num_frames=8, context_length=length, context_stride=stride)
        assert plan(demo_model, walk_clip, opts).stride == stride
    with pytest.raises(InputError, match="--context-stride 0: expected 1..7"):
        plan(demo_model, walk_clip, GenerateOptions("a walk", num_frames=8, context_length=8, context_stride=0))


def test_an_engines_profile_is_checked_early_only_where_the_backend_takes_no_other_size(engine16, walk_clip):
    """ONNX Runtime and TensorRT run the profile's sizes only, so generate refuses others before
    loading; the triton backend compiles a size outside it just in time, so it is not refused."""
    from engine.load import check_options

    opts = GenerateOptions("a walk", num_frames=4, height=512, width=64, num_inference_steps=1)
    with pytest.raises(InputError, match="--height 512: height 512 is outside this engine's profile 64..256"):
        check_options(walk_clip, opts, engine=engine16, backend="onnxruntime")
    assert check_options(walk_clip, opts, engine=engine16, backend="triton").height == 512


@pytest.mark.parametrize("plans", [True, False])
def test_auto_on_a_gpu_checks_the_profile_early_where_it_resolves_to_tensorrt(engine16, walk_clip, monkeypatch, plans):
    """On a GPU, ``--backend auto`` picks TensorRT where the engine's plans fit the machine (then a
    size outside the profile is refused before loading) and the triton backend otherwise."""
    import engine.backends as backends
    from engine.load import check_options

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "_tensorrt_usable", lambda engine_dir: plans)
    opts = GenerateOptions("a walk", num_frames=4, height=512, width=64, num_inference_steps=1)
    if plans:
        with pytest.raises(InputError, match="--height 512: height 512 is outside this engine's profile 64..256"):
            check_options(walk_clip, opts, engine=engine16, backend="auto")
    else:
        assert check_options(walk_clip, opts, engine=engine16, backend="auto").height == 512


def test_resampling_note_names_both_frame_rates(demo_model, walk_clip):
    import dataclasses

    from finephys.sampler.poses import prepare_clip

    clip, notes = prepare_clip(dataclasses.replace(walk_clip, fps=12.0), demo_model)
    assert notes == ["resampled the clip from 24 frames at 12 fps to 16 frames at 8 fps"]
    assert clip.num_frames == 16


@pytest.mark.parametrize("extra,words", [
    (["--steps", "0"], "--steps: expected 1..1000, got 0"),
    (["--frames", "100000"], "--frames 100000: expected 1..24"),
    (["--deep-cache", "2", "--deep-cache-depth", "9"], "--deep-cache-depth 9: expected 1..2"),
    (["--prompt", "  "], "--prompt '  ': empty, expected a description of the video"),
    # were "--context-stride 1: expected 1..0" (an option not given), or taken without a word
    (["--frames", "6", "--context-length", "1"], "--context-length 1: expected 2..32 for 6 frames"),
    (["--frames", "6", "--context-stride", "-5"], "--context-stride -5: expected 1..15 so that windows overlap"),
    (["--guidance", "1e38"], "--guidance: expected a number in 0..100, got 1e+38"),  # wrote a black video
    (["--deep-cache-depth", "-99"], "--deep-cache-depth -99: expected a number >= 1"),
    (["--engine", "ENGINE", "--height", "512"], "--height 512: height 512 is outside this engine's profile 64..256"),
])
def test_option_errors_come_before_any_weights_load(tmp_path, monkeypatch, extra, words, request):
    """Options are checked against the model's config before its weights load (that took 14-16 s)."""
    import engine.load

    def no_load(*a, **k):
        raise AssertionError("weights were loaded before the options were checked")

    monkeypatch.setattr(engine.load, "load_model", no_load)
    if "ENGINE" in extra:  # the demo's engine directory: its profile is checked before it loads
        extra = [str(request.getfixturevalue("engine16")) if a == "ENGINE" else a for a in extra]
    args = ["generate", "--poses", "examples/walk.npz", "--prompt", "x", "--out", str(tmp_path / "v.mp4"), *extra]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output


def test_generate_help_gives_sizes_steps_and_guidance_their_defaults():
    from finephys.model.demo import demo_config

    cfg = demo_config()  # the help names the demo's defaults: it must follow the demo's config
    text = " ".join(CliRunner().invoke(main, ["generate", "--help"], terminal_width=200).output.split())
    for option, words in (("--height INTEGER", f"a multiple of 8 [default: the model's; {cfg.height} for the demo]"),
                          ("--width INTEGER", f"a multiple of 8 [default: the model's; {cfg.width} for the demo]"),
                          ("--steps INTEGER", f"[default: the model's; {cfg.num_inference_steps} for the demo]"),
                          ("--guidance FLOAT", f"[default: the model's; {cfg.guidance_scale:g} for the demo]")):
        assert option in text and words in text.split(option, 1)[1][:120], option


def test_mp4_without_imageio_ffmpeg_is_refused_before_any_work(tmp_path, monkeypatch):
    """A machine without the MP4 writer gets one line at once, not a traceback after the clip."""
    import importlib.util

    from engine.outputs import check_output

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "imageio_ffmpeg" else real(name, *a))
    with pytest.raises(InputError, match="--out .*a.mp4: writing MP4 needs imageio-ffmpeg"):
        check_output(tmp_path / "a.mp4", False, "--out", (".mp4",))
    check_output(tmp_path / "frames", False, "--frames-dir", ())  # PNG frames still work


def test_oversized_windows_are_refused_before_loading_with_what_fits(tmp_path):
    """--height 2048 --width 2048 ran one step for minutes; now one line, at once, naming what fits."""
    from engine.load import check_options
    from finephys.poses.clip import load_clip

    out = tmp_path / "v.mp4"
    r = CliRunner().invoke(main, ["generate", "--poses", "examples/walk.npz", "--prompt", "a person", "--out", str(out),
                                  "--height", "2048", "--width", "2048"])
    assert r.exit_code == 2 and not out.exists()
    assert ("--height 2048 --width 2048: 16 frames x 2048x2048 = 67,108,864 pixels per window, over --max-pixels "
            "16,777,216 (at 16 frames at most 1024x1024 or at 2048x2048 at most 4 frames per window") in r.output
    clip = load_clip("examples/walk.npz")
    check_options(clip, GenerateOptions("a", height=2048, width=2048, context_length=4, context_stride=2))  # fits
    check_options(clip, GenerateOptions("a", height=1024, width=1024))  # exactly the default cap
    with pytest.raises(InputError, match="over --max-pixels 1,000,000"):
        check_options(clip, GenerateOptions("a", height=512, width=512, max_pixels=1_000_000))
    r = CliRunner().invoke(main, ["generate", "--poses", "examples/walk.npz", "--prompt", "a person", "--out", str(out),
                                  "--height", "2048", "--width", "2048", "--max-pixels", "100000000", "--steps", "0"])
    assert r.exit_code == 2 and "--steps" in r.output and "max-pixels" not in r.output  # the cap was raised


def test_outputs_are_checked_for_permission_and_kind_before_any_work(tmp_path, monkeypatch):
    """A folder that takes no new files, or a folder where a file goes (even with --overwrite),
    gets one line before the weights load, and nothing is written."""
    import engine.load
    import finephys.files

    locked = tmp_path / "locked"
    locked.mkdir()
    real = finephys.files.writable_folder
    monkeypatch.setattr(finephys.files, "writable_folder", lambda f: real(f) and Path(f) != locked)
    monkeypatch.setattr(engine.load, "load_model", lambda *a, **k: pytest.fail("weights loaded before the checks"))
    (tmp_path / "dir.npz").mkdir()
    base = ["generate", "--poses", "examples/walk.npz", "--prompt", "a walk", *SMALL]
    for extra, words in (
            (["--out", str(locked / "v.mp4")], f"--out {locked / 'v.mp4'}: cannot write in the folder {locked}"),
            (["--frames-dir", str(tmp_path / "f"), "--save-poses", str(tmp_path / "dir.npz"), "--overwrite"],
             "dir.npz: is a folder, expected a file to replace")):
        r = CliRunner().invoke(main, base + extra)
        assert r.exit_code == 2 and words in r.output and r.output.count("\n") == 1, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.npz", "locked"] and not any(locked.iterdir())
    assert not real(tmp_path / "dir.npz" / "missing") and not real(Path("/proc"))


def test_a_failed_write_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    """What no check can foresee (the disk refuses a frame half-way) still ends in one line."""
    import engine.outputs

    def refuse(self, frame):
        raise PermissionError(13, "Permission denied", str(tmp_path / "f" / "frame_00000.png"))

    monkeypatch.setattr(engine.outputs.PngSequence, "append", refuse)
    r = CliRunner().invoke(main, ["generate", "--poses", "examples/walk.npz", "--prompt", "a walk",
                                  "--frames-dir", str(tmp_path / "f"), *SMALL])
    last = r.output.strip().splitlines()[-1]  # after the progress bar
    assert r.exit_code == 2 and last == f"error: {tmp_path / 'f' / 'frame_00000.png'}: Permission denied", r.output
    assert "Traceback" not in r.output


def test_video_options_are_checked_before_the_detection_and_no_clip_is_left(tmp_path, monkeypatch):
    """generate --video: a bad size or an empty prompt is refused before detection starts; a
    check that needs the detected clip (--frames) leaves no --save-clip behind."""
    import engine.cli.detect
    from finephys.poses.clip import load_clip

    video = tmp_path / "in.mp4"
    video.write_bytes(b"not read: detection is replaced")
    ran = []
    clip = load_clip("examples/walk.npz")
    monkeypatch.setattr(engine.cli.detect, "run_detection",
                        lambda *a, **k: ran.append(1) or type("R", (), {"clip": clip, "found": np.ones(24, bool)})())
    base = ["generate", "--video", str(video), "--out", str(tmp_path / "v.mp4"), "--save-clip", str(tmp_path / "c.npz")]
    for extra, words in ((["--prompt", "a walk", "--height", "60"], "--height 60: expected a positive multiple of 8"),
                         (["--prompt", ""], "--prompt '': empty")):
        r = CliRunner().invoke(main, base + extra)
        assert r.exit_code == 2 and words in r.output and not ran, r.output
    r = CliRunner().invoke(main, base + ["--prompt", "a walk", "--frames", "400"])
    assert r.exit_code == 2 and "--frames 400" in r.output and ran and not (tmp_path / "c.npz").exists(), r.output

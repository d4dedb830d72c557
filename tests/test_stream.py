"""Streaming generation: windows, blending across seams, progressive output, bounded memory."""
import dataclasses
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from engine.load import load_model
from finephys.sampler.options import GenerateOptions
from finephys.sampler.stream import generate, generate_stream
from engine.video import read_video
from finephys.poses.clip import save_clip
from finephys.model.demo import SCHEDULER
from finephys.errors import InputError
from finephys.sampler.loop import Request, context_windows, denoise_windows
from finephys.sampler.options import Plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_context_windows_cover_the_clip():
    assert context_windows(10, 16, 12) == [(0, 10)]
    assert context_windows(40, 16, 12) == [(0, 16), (12, 28), (24, 40)]
    assert context_windows(30, 16, 12) == [(0, 16), (12, 28), (14, 30)]


class WindowBiasModel:
    """A fake backend: each window pushes its latents towards its own constant (taken from the
    'heatmaps' the test hands in), so without blending every seam would jump by the difference."""

    device, dtype, latent_channels, vae_scale_factor = torch.device("cpu"), torch.float32, 1, 8

    def __init__(self):
        from types import SimpleNamespace

        from diffusers import DDIMScheduler

        self.config = SimpleNamespace(scheduler=SCHEDULER)  # the sampler's DDIM schedule reads it
        self.sched = DDIMScheduler.from_config(SCHEDULER)  # its alphas, for the epsilon below

    def encode_text(self, prompts):
        return torch.zeros(len(prompts), 1, 1)

    def encode_pose(self, heatmaps):
        return [heatmaps]

    def predict_noise(self, x, t, text, feats):
        """The epsilon for which DDIM's clean-sample estimate is the window's constant."""
        a = self.sched.alphas_cumprod[int(t)]
        target = feats[0][:, :1, :1, :1].reshape(1, 1, -1, 1, 1)
        return (x - a.sqrt() * target) / (1 - a).sqrt()


def test_blending_ramps_across_seams():
    model = WindowBiasModel()
    levels = {0: 0.0, 6: 3.0, 12: -3.0}

    def heatmaps(a, b):
        return torch.full((b - a, 1, 8, 8), levels[a])

    plan = Plan(frames=20, height=8, width=8, steps=10, guidance=1.0, length=8, stride=6)
    chunks = list(denoise_windows(model, plan, [Request(heatmaps, "")], progress=False))
    assert [(a, b) for a, b, _ in chunks] == [(0, 6), (6, 12), (12, 20)]
    lat = torch.cat([c for _, _, c in chunks], dim=2)[0, 0].mean(dim=(1, 2))  # one value per frame
    steps = (lat[1:] - lat[:-1]).abs()
    # Away from the overlaps every frame sits at its window's level ...
    for frames, level in ((slice(0, 6), 0.0), (slice(8, 12), 3.0), (slice(14, 20), -3.0)):
        assert (lat[frames] - level).abs().max() < 0.1
    # ... and across each overlap (2 frames) the change is spread out: a hard seam would jump by
    # the full difference (3, then 6) in one frame; the largest single step is at most 55% of it.
    assert steps[5:8].max() <= 0.55 * 3.0 and steps[11:14].max() <= 0.55 * 6.0



def test_a_stop_check_ends_the_loop_before_the_next_unet_call():
    """``should_stop`` is asked before every step: once it says stop, StopRequested says how many
    steps ran (over windows), and the UNet is not called again; the window in flight yields nothing."""
    from finephys.sampler.loop import StopRequested

    model, calls = WindowBiasModel(), []
    predict = model.predict_noise
    model.predict_noise = lambda *a: calls.append(1) or predict(*a)
    plan = Plan(frames=20, height=8, width=8, steps=5, guidance=1.0, length=8, stride=6)
    heatmaps = lambda a, b: torch.zeros((b - a, 1, 8, 8))  # noqa: E731
    chunks = []
    with pytest.raises(StopRequested, match="^after 7 of 15 denoising steps$"):
        for chunk in denoise_windows(model, plan, [Request(heatmaps, "")], progress=False,
                                     should_stop=lambda: len(calls) == 7):
            chunks.append(chunk)
    assert len(calls) == 7 and [c[:2] for c in chunks] == [(0, 6)]


def test_the_first_signal_asks_for_a_stop_and_the_second_stops_at_once():
    from engine.cli.common import StopAtStep

    stop, before = StopAtStep(), signal.getsignal(signal.SIGTERM)
    with stop.installed():
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert stop()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    assert signal.getsignal(signal.SIGTERM) is before

@pytest.fixture(scope="module")
def demo_model():
    return load_model(None)


def test_a_batch_of_requests_gives_each_its_own_latents(demo_model):
    """One sampler loop for the CLI and serve's batches: stacked requests (own pose, prompt, seed and
    guidance scale) get what each gets alone, over two windows."""
    g = torch.Generator().manual_seed(3)
    maps = [torch.rand(14, 17, 32, 32, generator=g) for _ in range(2)]
    fns = [lambda a, b, m=m: m[a:b] for m in maps]
    reqs = [("a person walks", "blurry", 7.5, 11), ("a person jumps", "", 3.0, 12)]
    plan = Plan(frames=14, height=32, width=32, steps=3, guidance=7.5, length=8, stride=6)
    run = lambda requests: list(denoise_windows(demo_model, plan, requests, progress=False))  # noqa: E731
    requests = [Request(fn, prompt, neg, scale, seed) for fn, (prompt, neg, scale, seed) in zip(fns, reqs)]
    batch = run(requests)
    assert [(a, b) for a, b, _ in batch] == [(0, 6), (6, 14)]
    for i, request in enumerate(requests):
        alone = run([request])
        for (_, _, lb), (_, _, la) in zip(batch, alone):
            torch.testing.assert_close(lb[i : i + 1], la, rtol=1e-4, atol=1e-4)
    # guidance off for both (scales <= 1 differ, and do not matter): each as alone, without guidance
    off = run([Request(fns[0], "a", "", 1.0, 4), Request(fns[1], "b", "", 0.5, 5)])
    alone = run([Request(fns[1], "b", "", 1.0, 5)])
    torch.testing.assert_close(off[-1][2][1:], alone[-1][2], rtol=1e-4, atol=1e-4)
    with pytest.raises(InputError, match="guidance_scales"):
        run([Request(fns[0], "", "", 7.5, 0), Request(fns[1], "", "", 1.0, 1)])


def test_stream_gives_exactly_the_frames_asked(demo_model, walk_clip):
    opts = GenerateOptions("a walk", num_frames=22, height=32, width=32, num_inference_steps=1,
                           context_length=8, context_stride=6)
    stream = generate_stream(demo_model, walk_clip, opts, progress=False)
    chunks = list(stream.chunks())
    assert [c[0] for c in chunks] == [0, 6, 12, 14]  # windows [0,8) [6,14) [12,20) [14,22)
    assert sum(len(c[2]) for c in chunks) == 22
    whole = generate(demo_model, walk_clip, opts, progress=False)
    assert whole.frames.shape == (22, 32, 32, 3) and whole.latents.shape[2] == 22
    assert np.array_equal(np.concatenate([c[2] for c in chunks]), whole.frames)


@pytest.fixture(scope="module")
def static_jumps(demo_model, walk_clip):
    """Mean |frame difference| (0-255) between consecutive frames of a 20-frame static pose in
    windows [0,8) [6,14) [12,20): the output switches windows after frames 5 and 11, and window k's
    overlap with window k-1 ends after frames 7 and 13."""
    static = dataclasses.replace(walk_clip, keypoints=np.repeat(walk_clip.keypoints[:1], 20, 0),
                                 scores=np.repeat(walk_clip.scores[:1], 20, 0))
    opts = GenerateOptions("a person standing", height=96, width=96, num_inference_steps=6,
                           context_length=8, context_stride=6)
    frames = generate(demo_model, static, opts, progress=False).frames.astype(np.float32)
    return np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))


SWITCHES, OVERLAP_ENDS = [5, 11], [7, 13]


def test_static_pose_shows_no_seam_where_the_output_switches_windows(static_jumps):
    jumps = static_jumps
    inside = np.delete(jumps, SWITCHES + OVERLAP_ENDS)  # transitions within one window's own frames
    # margin: a seam's jump is at most 10% above the largest jump between frames of one window
    assert jumps[SWITCHES].max() <= 1.1 * inside.max(), (jumps[SWITCHES], inside.max())


@pytest.mark.xfail(strict=True, reason="issue 21: the frame after each overlap jumps 2-3x more than frames inside a "
                                       "window (7->8 15.8/255 against 4-5 at 128x128, 10 steps); neither the ramp "
                                       "nor replacing the overlap outright removes it")
def test_static_pose_shows_no_seam_where_the_overlap_ends(static_jumps):
    jumps = static_jumps
    inside = np.delete(jumps, SWITCHES + OVERLAP_ENDS)
    assert jumps[OVERLAP_ENDS].max() <= 1.1 * inside.max(), (jumps[OVERLAP_ENDS], inside.max())


def _long_clip(path, frames):
    from finephys.poses.clip import load_clip, loop_clip

    save_clip(loop_clip(load_clip(os.path.join(ROOT, "examples", "walk.npz")), frames), path)
    return str(path)


def sigterm_after_frames(cmd, pngs, frames=3):
    """Run ``cmd`` (a generate writing PNGs to ``pngs``), send SIGTERM once ``frames`` PNGs exist, check
    it stops as interrupted (exit 130, one line, no traceback); the PNGs written by then."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(list(pngs.glob("frame_*.png"))) < frames:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    return len(list(pngs.glob("frame_*.png")))


def test_interrupted_run_leaves_a_playable_partial_file(tmp_path):
    clip = _long_clip(tmp_path / "long.npz", 48)
    out, pngs = tmp_path / "v.mp4", tmp_path / "frames"
    cmd = [sys.executable, "-m", "engine", "generate", "--poses", clip, "--prompt", "a walk", "--out", str(out),
           "--frames-dir", str(pngs), "--height", "64", "--width", "64", "--steps", "3",
           "--context-length", "4", "--context-stride", "2"]
    done = sigterm_after_frames(cmd, pngs)
    video = read_video(out)
    assert 3 <= done < 48 and done <= len(video) < 48
    assert video.shape[1:] == (64, 64, 3)
    assert not list(tmp_path.glob(".v.*"))


PEAK = """
import gc, sys, torch
from engine.load import load_model
from finephys.sampler.options import GenerateOptions
from finephys.sampler.stream import generate_stream
from finephys.poses.clip import load_clip
m = load_model(None)
def live_bytes():  # every torch storage still referenced: deterministic, unlike the process's RSS
    gc.collect()
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in gc.get_objects() if torch.is_tensor(t)}.values())
stream = generate_stream(m, load_clip(sys.argv[1]), GenerateOptions("a walk", height=32, width=32,
                         num_inference_steps=1, guidance_scale=1.0), progress=False)
base = live_bytes()  # the model and the clip's pose stages, computed before the first window
n, peak = 0, 0
for frame in stream:
    if n % 8 == 0:
        peak = max(peak, live_bytes() - base)
    n += 1
print(n, peak)
"""


@pytest.mark.slow
def test_live_tensors_do_not_grow_with_the_clip(tmp_path):
    """Streaming keeps one window's worth of tensors whatever the clip's length: beyond the model
    and the clip's pose stages, the most bytes of live torch storage while a 256-frame clip streams
    is that of a 64-frame clip (equal here; 4 KB allowed). A planted leak of the overlap latents
    adds 16 KB; keeping every frame's latents would add 48 KB at 32x32, every decoded frame 2.3 MB."""
    peaks = {}
    for frames in (64, 256):
        clip = _long_clip(tmp_path / f"c{frames}.npz", frames)
        p = subprocess.run([sys.executable, "-c", PEAK, clip], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr
        count, peak = map(int, p.stdout.split())
        assert count == frames
        peaks[frames] = peak
    assert abs(peaks[256] - peaks[64]) <= 4096, peaks


@pytest.mark.parametrize("overrides,steps", [({}, 7), ({}, 25), ({"timestep_spacing": "trailing"}, 10),
                                             ({"timestep_spacing": "linspace", "set_alpha_to_one": True}, 9),
                                             ({"beta_schedule": "scaled_linear", "steps_offset": 0}, 50)])
def test_ddim_schedule_matches_diffusers(overrides, steps):
    from diffusers import DDIMScheduler

    from finephys.sampler.loop import DdimSchedule

    config = {**SCHEDULER, **overrides}
    ref = DDIMScheduler.from_config(config)
    ref.set_timesteps(steps)
    ours = DdimSchedule(config, steps, "cpu")
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    assert ours.init_noise_sigma == ref.init_noise_sigma
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 3, 8, 8, generator=g)
    for i, t in enumerate(ref.timesteps):
        eps = torch.randn(x.shape, generator=g)
        want = ref.step(eps, t, x).prev_sample
        got = ours.step(i, eps, x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        x = want


def test_ddim_schedule_refuses_what_it_does_not_step():
    from finephys.sampler.loop import DdimSchedule

    for bad, match in (({"prediction_type": "v_prediction"}, "prediction_type"),
                       ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"), ({}, "steps 0")):
        with pytest.raises(InputError, match=match):
            DdimSchedule({**SCHEDULER, **bad}, 0 if not bad else 10, "cpu")


def test_decoded_frames_are_contiguous(demo_model):
    """Frames as laid out (F,H,W,3): what the video writers and the NCCL sends of --parallel expect."""
    from finephys.sampler.stream import decode

    latents = torch.randn(1, demo_model.latent_channels, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    frames = decode(demo_model, latents, chunk=2)
    side = 4 * demo_model.vae_scale_factor
    assert frames.shape == (3, side, side, 3) and frames.dtype == np.uint8 and frames.flags["C_CONTIGUOUS"]


def test_an_interrupted_run_names_only_what_it_wrote(tmp_path):
    """Interrupted before the first frame: no file, and the message says nothing was written (it
    used to name a file that never existed); after two frames it names the playable file."""
    from engine.outputs import interrupted_line, stream_frames

    def frames(n):
        for _ in range(n):
            yield np.zeros((16, 16, 3), np.uint8)
        raise KeyboardInterrupt

    out = tmp_path / "none.mp4"
    count, interrupt = stream_frames(frames(0), 8.0, out, None, False)
    assert count == 0 and isinstance(interrupt, KeyboardInterrupt) and not out.exists()
    assert interrupted_line(count, out, None) == "interrupted before the first frame was finished: nothing was written"
    out = tmp_path / "two.mp4"
    count, interrupt = stream_frames(frames(2), 8.0, out, None, False)
    assert interrupt is not None and read_video(out).shape == (2, 16, 16, 3)
    assert interrupted_line(count, out, None) == f"interrupted: {out} holds the 2 frames finished so far"


def _follow_stderr(proc):
    """Collect ``proc``'s stderr as it comes (tqdm rewrites its line with \\r, so not line by line),
    on a thread; returns a function giving what has arrived so far."""
    import threading

    chunks = []

    def read():
        while chunk := os.read(proc.stderr.fileno(), 4096):
            chunks.append(chunk)

    threading.Thread(target=read, daemon=True).start()
    return lambda: b"".join(chunks).decode(errors="replace")


@pytest.mark.slow  # about 20 s: a real generate subprocess at 384x384
def test_sigterm_stops_at_the_next_step_and_leaves_nothing_before_a_frame(tmp_path):
    """SIGTERM during step 2 (of 6, 2-3 s each on 2 cores, one window): the run finishes that step,
    stops before the UNet runs again, says where and that nothing was written, and leaves no file or
    folder (it used to stop wherever the signal landed, and leave an empty --frames-dir)."""
    import re

    cmd = [sys.executable, "-m", "engine", "generate", "--poses", os.path.join(ROOT, "examples", "walk.npz"),
           "--prompt", "a walk", "--out", str(tmp_path / "v.mp4"), "--frames-dir", str(tmp_path / "frames"),
           "--frames", "8", "--height", "384", "--width", "384", "--steps", "6"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = _follow_stderr(proc)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not re.search(r"\| 1/6 ", err()):
        time.sleep(0.05)  # until the progress bar shows step 1 done: step 2 is running
    assert proc.poll() is None, err()
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    proc.wait(timeout=120)
    assert time.time() - sent < 30, err()  # the rest of a step, not of the run
    time.sleep(0.2)  # the reader's last chunk
    assert proc.returncode == 130 and "Traceback" not in err(), err()
    last = err().strip().splitlines()[-1]
    m = re.fullmatch(r".*interrupted after (\d) of 6 denoising steps, before the first frame was finished: "
                     r"nothing was written", last)
    assert m and 2 <= int(m.group(1)) <= 3, err()  # step 2 was finished, not cut short
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_png_frames_are_written_with_zlibs_fastest_level(tmp_path):
    """A 512x512 frame costs 75 ms at PIL's default level and 15 ms at level 1 (lossless either way):
    the zlib header of the frame's data says which level wrote it (FLEVEL 0 = fastest)."""
    import struct

    from engine.outputs import PngSequence
    frame = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    seq = PngSequence(tmp_path / "f", overwrite=False)
    seq.append(frame)
    seq.close()
    data = (tmp_path / "f" / "frame_00000.png").read_bytes()
    at = 8
    while data[at + 4:at + 8] != b"IDAT":
        at += 12 + struct.unpack(">I", data[at:at + 4])[0]
    assert data[at + 9] >> 6 == 0  # zlib FLG: FLEVEL in the top two bits
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(tmp_path / "f" / "frame_00000.png")), frame)


def test_png_frames_written_on_threads_keep_their_order_content_and_errors(tmp_path, monkeypatch):
    """Frames compressed on several threads land under their own index with their own pixels
    (each is copied when handed over: the caller may reuse its buffer), and a frame the disk
    refuses surfaces from close() as the OSError it was."""
    from PIL import Image

    from engine.outputs import PngSequence
    rng = np.random.default_rng(1)
    frames = [(rng.random((32, 48, 3)) * 255).astype(np.uint8) for _ in range(9)]
    seq = PngSequence(tmp_path / "f", overwrite=False, threads=3)
    buf = np.empty_like(frames[0])
    for f in frames:
        buf[:] = f  # one buffer, overwritten after each append
        seq.append(buf)
    seq.close()
    names = sorted(p.name for p in (tmp_path / "f").iterdir())
    assert names == [f"frame_{i:05d}.png" for i in range(9)]
    for i, f in enumerate(frames):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "f" / names[i])), f)

    def refuse(self, frame, index):
        raise PermissionError(13, "Permission denied", f"frame {index}")

    monkeypatch.setattr(PngSequence, "_write", refuse)
    seq = PngSequence(tmp_path / "g", overwrite=False, threads=2)
    seq.append(frames[0])
    with pytest.raises(PermissionError):
        seq.close()

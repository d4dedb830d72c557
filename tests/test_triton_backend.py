"""The `triton` backend on a CUDA GPU: the same poses as the reference, and latents within
DESIGN.md's fp16 rule of the fp32 reference (err <= 2 * err(eager fp16) + atol)."""
import numpy as np
import pytest
import torch

from finephys.sampler.options import GenerateOptions
from finephys.sampler.stream import generate, generate_stream
from finephys.model.demo import load_demo
from finephys.model.assembly import assemble
from finephys.sampler.poses import prepare_clip, run_pose_stack
from finephys.sampler.stream import decode


ATOL = 1e-3


@pytest.fixture(scope="module")
def models():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none on this machine)")
    from engine.backends.triton import triton_from_parts

    ref32 = assemble(load_demo(), device="cuda")
    ref16 = assemble(load_demo(), device="cuda", dtype=torch.float16)
    fast = triton_from_parts(load_demo())
    return ref32, ref16, fast


@pytest.mark.gpu
def test_same_poses_as_reference(models, walk_clip):
    ref32, _, fast = models
    clip, _ = prepare_clip(walk_clip, ref32)
    a, b = run_pose_stack(ref32, clip), run_pose_stack(fast, clip)
    for name in ("s_dd", "s_pp", "s_fused", "projected_2d"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("frames,size", [(16, 64), (24, 128)])
def test_latents_within_the_fp16_rule(models, walk_clip, frames, size):
    ref32, ref16, fast = models
    opts = GenerateOptions("a person walking", num_frames=frames, height=size, width=size, num_inference_steps=4,
                           seed=1)
    want = generate(ref32, walk_clip, opts, progress=False).latents.float()
    eager16 = generate(ref16, walk_clip, opts, progress=False).latents.float()
    got = generate(fast, walk_clip, opts, progress=False)
    err_fast = (got.latents.float() - want).abs().max().item()
    err_eager = (eager16 - want).abs().max().item()
    assert err_fast <= 2 * err_eager + ATOL, (err_fast, err_eager)
    assert got.frames.shape == (frames, size, size, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("interval,depth", [(3, 1), (2, 2)])
def test_deep_cache_within_the_fp16_rule(models, walk_clip, interval, depth):
    """The triton backend's caching and shallow graphs against the fp32 reference's DeepCache."""
    ref32, ref16, fast = models
    opts = GenerateOptions("a person walking", num_frames=16, height=64, width=64, num_inference_steps=6, seed=1,
                           deep_cache=interval, deep_cache_depth=depth)
    want = generate(ref32, walk_clip, opts, progress=False).latents.float()
    err_eager = (generate(ref16, walk_clip, opts, progress=False).latents.float() - want).abs().max().item()
    err_fast = (generate(fast, walk_clip, opts, progress=False).latents.float() - want).abs().max().item()
    assert err_fast <= 2 * err_eager + ATOL, (err_fast, err_eager)


@pytest.mark.gpu
def test_side_stream_decode_gives_the_synchronous_frames(models, walk_clip):
    """Windows decode on a side stream while the next window denoises; every chunk's frames must be
    exactly those of a plain synchronous decode of its latents, in order."""
    _, _, fast = models
    opts = GenerateOptions("a person walking", num_frames=24, height=64, width=64, num_inference_steps=3, seed=2,
                           context_length=8, context_stride=6)
    chunks = list(generate_stream(fast, walk_clip, opts, progress=False).chunks())
    assert len(chunks) >= 3 and [c[0] for c in chunks] == sorted(c[0] for c in chunks)
    assert sum(len(c[2]) for c in chunks) == 24
    for _, latents, frames in chunks:
        np.testing.assert_array_equal(frames, decode(fast, latents))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_triton_backend_refused_without_a_gpu(tmp_path):
    from click.testing import CliRunner

    from engine.cli.app import main

    r = CliRunner().invoke(main, ["generate", "--poses", "examples/walk.npz", "--prompt", "x", "--engine", str(tmp_path),
                                  "--backend", "triton", "--out", str(tmp_path / "v.mp4")])
    assert r.exit_code == 2 and "needs a CUDA GPU" in r.output and "Traceback" not in r.output, r.output

"""Heatmap kernel vs its reference, and the reference vs the formula of DESIGN.md step 6."""
import math

import pytest
import torch

from fpkernels.heatmap import _render_heatmaps_triton, render_heatmaps, render_heatmaps_ref


def make_inputs(B, T, J, H, W, device="cpu", gen=None, dtype=torch.float32):
    """Keypoints spread a little beyond the image (off-image joints still leave tails), visibility in (0,1]."""
    g = gen if gen is not None else torch.Generator().manual_seed(0)
    kp = (torch.rand(B, T, J, 2, generator=g) * 1.2 - 0.1) * torch.tensor([W, H])
    vis = torch.rand(B, T, J, generator=g) * 0.9 + 0.1
    return kp.to(device=device, dtype=dtype), vis.to(device)


def test_ref_matches_formula_float64(gen):
    B, T, J, H, W, sigma = 1, 2, 3, 7, 9, 1.7
    kp, vis = make_inputs(B, T, J, H, W, gen=gen)
    got = render_heatmaps_ref(kp, vis, H, W, sigma)
    want = torch.empty(B, T, J, H, W, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for j in range(J):
                u, v = float(kp[b, t, j, 0]), float(kp[b, t, j, 1])
                for y in range(H):
                    for x in range(W):
                        want[b, t, j, y, x] = float(vis[b, t, j]) * math.exp(
                            -((x - u) ** 2 + (y - v) ** 2) / (2 * sigma**2)
                        )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "B,T,J,H,W,sigma",
    [(1, 1, 1, 8, 8, 2.0), (1, 2, 3, 16, 24, 2.5), (2, 1, 17, 37, 53, 3.0), (1, 3, 2, 64, 40, 1.0),
     (1, 1, 2, 5, 300, 4.0)],
)
def test_kernel_matches_ref_fp32(interp, gen, B, T, J, H, W, sigma):
    kp, vis = make_inputs(B, T, J, H, W, gen=gen)
    got = render_heatmaps(kp, vis, H, W, sigma, use_kernel=True)
    want = render_heatmaps_ref(kp, vis, H, W, sigma)
    assert got.shape == (B, T, J, H, W) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_kernel_small_tiles(interp, gen):
    kp, vis = make_inputs(2, 2, 3, 21, 19, gen=gen)
    got = _render_heatmaps_triton(kp, vis, 21, 19, 2.0, torch.float32, 1, block_h=4, block_w=8)
    torch.testing.assert_close(got, render_heatmaps_ref(kp, vis, 21, 19, 2.0), rtol=1e-5, atol=1e-7)


# bf16: the interpreter rounds fp32 -> bf16 toward zero (the GPU and torch round to nearest): 1 ulp apart
@pytest.mark.parametrize("out_dtype,tol", [(torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-7)])
def test_kernel_low_precision_output(interp, gen, out_dtype, tol):
    kp, vis = make_inputs(2, 2, 5, 24, 32, gen=gen)
    got = render_heatmaps(kp, vis, 24, 32, 2.0, out_dtype, use_kernel=True)
    want = render_heatmaps_ref(kp, vis, 24, 32, 2.0, out_dtype)
    assert got.dtype == out_dtype
    # both round the same fp32 numbers once: at most one unit in the last place apart
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=1e-6)


def test_kernel_half_keypoints_and_bool_visibility(interp, gen):
    kp, vis = make_inputs(1, 2, 4, 16, 16, gen=gen, dtype=torch.float16)
    vis = vis > 0.5
    got = render_heatmaps(kp, vis, 16, 16, 2.0, use_kernel=True)
    torch.testing.assert_close(got, render_heatmaps_ref(kp, vis, 16, 16, 2.0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("r", [2, 4])
@pytest.mark.parametrize("use_kernel", [False, True])
def test_unshuffled_layout_matches_pixel_unshuffle(gen, r, use_kernel, request):
    if use_kernel:
        request.getfixturevalue("interp")
    B, T, J, H, W = 1, 2, 3, 16, 24
    kp, vis = make_inputs(B, T, J, H, W, gen=gen)
    got = render_heatmaps(kp, vis, H, W, 2.0, unshuffle=r, use_kernel=use_kernel)
    maps = render_heatmaps_ref(kp, vis, H, W, 2.0)
    want = torch.nn.functional.pixel_unshuffle(maps.reshape(B * T, J, H, W), r).reshape(B, T, J * r * r, H // r, W // r)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_dispatch_on_cpu_uses_the_reference(gen, monkeypatch):
    """Routing: on CPU tensors the default never enters the kernel path (made to raise here)."""
    import fpkernels.heatmap as mod

    def kernel(*a, **k):
        raise AssertionError("the Triton path was taken for CPU tensors")

    monkeypatch.setattr(mod, "_render_heatmaps_triton", kernel)
    kp, vis = make_inputs(1, 2, 3, 12, 10, gen=gen)
    want = render_heatmaps_ref(kp, vis, 12, 10, 2.0, torch.float16)
    assert torch.equal(render_heatmaps(kp, vis, 12, 10, 2.0, torch.float16), want)
    assert torch.equal(render_heatmaps(kp, vis, 12, 10, 2.0, torch.float16, use_kernel=False), want)
    with pytest.raises(AssertionError, match='Triton path'):  # the patch is live: forcing it enters it
        render_heatmaps(kp, vis, 12, 10, 2.0, torch.float16, use_kernel=True)


def _bad_cases():
    kp, vis = make_inputs(1, 2, 3, 8, 8)
    yield "keypoints", (kp[..., 0], vis, 8, 8, 2.0), {}
    yield "keypoints", (kp[..., None], vis, 8, 8, 2.0), {}
    yield "keypoints", (kp.numpy(), vis, 8, 8, 2.0), {}
    yield "visibility", (kp, vis[:, :1], 8, 8, 2.0), {}
    yield "visibility", (kp, vis[..., None], 8, 8, 2.0), {}
    yield "height", (kp, vis, 0, 8, 2.0), {}
    yield "height", (kp, vis, 8.5, 8, 2.0), {}
    yield "width", (kp, vis, 8, -3, 2.0), {}
    for sigma in (0.0, -1.0, math.nan, math.inf, None):
        yield "sigma", (kp, vis, 8, 8, sigma), {}
    yield "out_dtype", (kp, vis, 8, 8, 2.0), {"out_dtype": torch.int32}
    yield "unshuffle", (kp, vis, 8, 8, 2.0), {"unshuffle": 3}
    yield "unshuffle", (kp, vis, 8, 8, 2.0), {"unshuffle": 0}


@pytest.mark.parametrize("use_kernel", [False, True])
@pytest.mark.parametrize("name,args,kw", list(_bad_cases()))
def test_bad_arguments_raise_value_error_naming_them(name, args, kw, use_kernel):
    with pytest.raises(ValueError, match=f"^{name}:"):
        render_heatmaps(*args, use_kernel=use_kernel, **kw)


def test_ref_bad_arguments_raise_value_error(gen):
    kp, vis = make_inputs(1, 1, 2, 8, 8, gen=gen)
    with pytest.raises(ValueError, match="^sigma:"):
        render_heatmaps_ref(kp, vis, 8, 8, 0.0)
    with pytest.raises(ValueError, match="^visibility:"):
        render_heatmaps_ref(kp, vis[..., :1], 8, 8, 1.0)


# ---------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "B,T,J,H,W", [(16, 1, 17, 512, 512), (1, 16, 17, 256, 256), (2, 3, 5, 37, 53), (1, 1, 1, 8, 8)]
)
def test_gpu_kernel_matches_ref(B, T, J, H, W, out_dtype, gen):
    kp, vis = make_inputs(B, T, J, H, W, "cuda", gen=gen)
    got = render_heatmaps(kp, vis, H, W, 3.0, out_dtype)  # default dispatch: the kernel on CUDA
    want = render_heatmaps_ref(kp, vis, H, W, 3.0, out_dtype)
    # tl.exp and torch's exp differ in the last fp32 bits, which can move a rounding to the next
    # fp16/bf16 value: allow one unit in the last place of the output dtype
    tol = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[out_dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=1e-6)
    assert torch.equal(got, _render_heatmaps_triton(kp, vis, H, W, 3.0, out_dtype, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("r", [2, 8])
def test_gpu_unshuffled_layout(r, gen):
    B, T, J, H, W = 2, 16, 17, 512, 512
    kp, vis = make_inputs(B, T, J, H, W, "cuda", gen=gen)
    got = render_heatmaps(kp, vis, H, W, 3.0, torch.float16, unshuffle=r)
    want = render_heatmaps(kp, vis, H, W, 3.0, torch.float16, unshuffle=r, use_kernel=False)
    torch.testing.assert_close(got.float(), want.float(), rtol=2.0**-10, atol=1e-6)


@pytest.mark.gpu
def test_gpu_cached_launches_follow_sizes_and_sigma(gen):
    """Repeated calls replay cached compiled kernels (fpkernels.launch.Launcher); each must follow its
    own sizes, sigma and keypoints."""
    for _ in range(2):
        for B, T, J, H, W, sigma in [(1, 4, 17, 64, 64, 2.0), (1, 4, 17, 64, 64, 5.0), (2, 3, 5, 48, 80, 3.0)]:
            kp, vis = make_inputs(B, T, J, H, W, "cuda", gen)
            got = render_heatmaps(kp, vis, H, W, sigma)
            torch.testing.assert_close(got, render_heatmaps_ref(kp, vis, H, W, sigma), rtol=1e-5, atol=1e-6)

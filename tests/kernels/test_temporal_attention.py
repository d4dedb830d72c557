"""Temporal (short-sequence) attention kernel vs its reference, and the reference vs SDPA."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fpkernels.temporal_attention import _temporal_attention_triton, temporal_attention, temporal_attention_ref


def make_qkv(N, T, C, dtype=torch.float32, device="cpu", gen=None, fused=False):
    """Random q, k, v (N,T,C); with ``fused`` they are views into one (N,T,3C) projection output."""
    g = gen if gen is not None else torch.Generator().manual_seed(0)
    if fused:
        qkv = torch.randn(N, T, 3 * C, generator=g).to(device=device, dtype=dtype)
        return qkv.chunk(3, dim=-1)
    return tuple(torch.randn(N, T, C, generator=g).to(device=device, dtype=dtype) for _ in range(3))


def test_ref_matches_sdpa(gen):
    q, k, v = make_qkv(6, 16, 64, gen=gen, dtype=torch.float64)
    heads = 4
    split = [x.reshape(6, 16, heads, 16).transpose(1, 2) for x in (q, k, v)]
    want = F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(6, 16, 64)
    torch.testing.assert_close(temporal_attention_ref(q, k, v, heads), want)


@pytest.mark.parametrize("N,T,C,heads,fused", [(5, 16, 320, 8, True), (3, 7, 48, 2, False), (9, 24, 64, 1, True),
                                              (2, 1, 32, 4, False)])
def test_kernel_matches_ref_fp32(interp, gen, N, T, C, heads, fused):
    q, k, v = make_qkv(N, T, C, gen=gen, fused=fused)
    got = temporal_attention(q, k, v, heads, use_kernel=True)
    assert got.is_contiguous() and got.shape == (N, T, C)
    torch.testing.assert_close(got, temporal_attention_ref(q, k, v, heads), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("all_heads", [False, True])
def test_kernel_fp16_and_partial_blocks(interp, gen, all_heads):
    q, k, v = make_qkv(7, 16, 80, torch.float16, gen=gen, fused=True)
    got = _temporal_attention_triton(q, k, v, 2, bn=4, all_heads=all_heads)  # 7 sequences: a partial block
    torch.testing.assert_close(got.float(), temporal_attention_ref(q, k, v, 2).float(), rtol=2e-3, atol=2e-3)


def test_kernel_rejects_float64(interp, gen):
    q, k, v = make_qkv(2, 16, 32, torch.float64, gen=gen)
    with pytest.raises(ValueError, match="^q: expected dtype float32, float16, bfloat16"):
        temporal_attention(q, k, v, 4, use_kernel=True)


def test_dispatch_on_cpu_uses_the_reference(gen, monkeypatch):
    """Routing: on CPU tensors the default never enters the kernel path (made to raise here)."""
    import fpkernels.temporal_attention as mod

    def kernel(*a, **k):
        raise AssertionError("the Triton path was taken for CPU tensors")

    monkeypatch.setattr(mod, "_temporal_attention_op", kernel)
    q, k, v = make_qkv(2, 16, 32, gen=gen)
    assert torch.equal(temporal_attention(q, k, v, 4), temporal_attention_ref(q, k, v, 4))
    with pytest.raises(AssertionError, match='Triton path'):  # the patch is live: forcing it enters it
        temporal_attention(q, k, v, 4, use_kernel=True)


@pytest.mark.parametrize("name,mutate,heads", [
    ("q", lambda q, k, v: (q[0], k, v), 4),
    ("k", lambda q, k, v: (q, k[:, :8], v), 4),
    ("v", lambda q, k, v: (q, k, v.double()), 4),
    ("q", lambda q, k, v: (q.int(), k.int(), v.int()), 4),
    ("heads", lambda q, k, v: (q, k, v), 5),
    ("heads", lambda q, k, v: (q, k, v), 0),
])
@pytest.mark.parametrize("use_kernel", [False, True])
def test_bad_arguments_raise_value_error_naming_them(name, mutate, heads, use_kernel, gen):
    q, k, v = mutate(*make_qkv(2, 16, 32, gen=gen))
    with pytest.raises(ValueError, match=f"^{name}:"):
        temporal_attention(q, k, v, heads, use_kernel=use_kernel)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("N,T,C,heads,fused", [(8192, 16, 320, 8, True), (2048, 16, 640, 8, True),
                                              (128, 16, 1280, 8, False), (33, 12, 96, 3, True), (5, 32, 64, 1, False)])
def test_gpu_kernel_matches_ref(N, T, C, heads, fused, dtype, tol, gen):
    q, k, v = make_qkv(N, T, C, dtype, "cuda", gen=gen, fused=fused)
    want = temporal_attention_ref(q, k, v, heads).float()
    for _ in range(2):  # compile, then the cached launch
        torch.testing.assert_close(temporal_attention(q, k, v, heads).float(), want, rtol=tol, atol=tol)
    got = _temporal_attention_triton(q, k, v, heads, bn=2, num_warps=2, all_heads=True)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("fuse", [False, True])
def test_unet_with_temporal_processor_matches_diffusers(interp, gen, fuse):
    """The demo UNet with every motion-module self-attention on the kernel gives diffusers' output."""
    from engine.fast_unet import use_temporal_kernel
    from finephys.model.demo import demo_config
    from finephys.model.build import build_unet

    # the demo UNet cut to one cross-attention block and one plain block each way (plus the motion
    # mid block): every kind of motion module the kernel serves, at a size the interpreter runs fast
    cfg = demo_config()
    cfg = dataclasses.replace(cfg, unet={**cfg.unet, "block_out_channels": [16, 16],
                                         "down_block_types": ["CrossAttnDownBlockMotion", "DownBlockMotion"],
                                         "up_block_types": ["UpBlockMotion", "CrossAttnUpBlockMotion"]})
    unet = build_unet(cfg).eval()
    with torch.no_grad():
        for p in unet.parameters():  # diffusers zero-initialises the motion modules' output projections
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    x = torch.randn(1, 4, 6, 4, 4, generator=gen)  # batch 1, 6 frames, 4x4 latents: 16 sequences at the top
    text = torch.randn(6, 77, cfg.unet["cross_attention_dim"], generator=gen)
    with torch.no_grad():
        want = unet(x, torch.tensor(500), text).sample
        if fuse:
            unet.fuse_qkv_projections()
        assert use_temporal_kernel(unet, use_kernel=True) > 0
        got = unet(x, torch.tensor(500), text).sample
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        # the temporal attention is live: changing one motion-module projection changes the output
        name, attn = next((n, m) for n, m in unet.named_modules() if "motion_modules" in n and hasattr(m, "heads"))
        attn.to_out[0].weight.mul_(5.0)
        assert (unet(x, torch.tensor(500), text).sample - want).abs().max() > 1e-3, name


@pytest.mark.parametrize("dtype,layout,tol", [(torch.float32, "fused", 1e-5), (torch.float16, "fused", 2e-3),
                                              (torch.float32, "mixed", 1e-5)])
def test_the_packages_kernel_with_constant_strides_matches_ref(interp, gen, dtype, layout, tol):
    """The kernel AOTInductor packages carry (sizes and strides as compile-time constants); "mixed":
    q contiguous, k a slice of a wider tensor, v frame-major, so every stride differs."""
    from fpkernels.temporal_attention import _static_launch, _temporal_attention_static
    if layout == "fused":
        q, k, v = make_qkv(5, 16, 80, dtype, gen=gen, fused=True)
    else:
        q = torch.randn(5, 16, 80, generator=gen, dtype=dtype)
        k = torch.randn(5, 16, 160, generator=gen, dtype=dtype)[..., 40:120]
        v = torch.randn(16, 5, 80, generator=gen, dtype=dtype).transpose(0, 1)
    out = torch.empty(q.shape, dtype=dtype)
    grid, consts = _static_launch(q, k, v, 2)
    _temporal_attention_static[grid](out, q, k, v, **consts)
    torch.testing.assert_close(out.float(), temporal_attention_ref(q, k, v, 2).float(), rtol=tol, atol=tol)


def test_the_aot_operator_takes_any_layout_and_empty_inputs(interp, gen):
    """``use_kernel="aot"`` (the operator packages carry), run eagerly: a v whose last stride is not 1
    is made contiguous for the kernel, and no sequences give an empty result without a launch."""
    q = torch.randn(3, 16, 32, generator=gen)
    k = torch.randn(3, 16, 32, generator=gen)
    v = torch.randn(3, 32, 16, generator=gen).transpose(1, 2)  # strides (512, 1, 16)
    got = temporal_attention(q, k, v, 2, use_kernel="aot")
    torch.testing.assert_close(got, temporal_attention_ref(q, k, v, 2), rtol=1e-5, atol=1e-5)
    assert temporal_attention(q[:0], k[:0], v[:0], 2, use_kernel="aot").shape == (0, 16, 32)

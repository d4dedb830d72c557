"""PhysNet fused kernel vs its reference, and the reference vs an independent float64 loop."""
import math

import pytest
import torch

from fpkernels.physnet import _physnet_fused_triton, physnet_fused, physnet_fused_ref

DT = 1.0 / 30.0


def make_inputs(B, T, J, dtype=torch.float32, device="cpu", gen=None, noncontig=False):
    """Random (never zero) inputs; with ``noncontig`` the solver inputs are slices of one head output."""
    D = 3 * J
    P = D * (D + 1) // 2
    g = gen if gen is not None else torch.Generator().manual_seed(0)
    s_dd = torch.randn(B, T, J, 3, generator=g) * 0.3
    if noncontig:
        head = torch.randn(B, T, 2, P + 2 * D + 5, generator=g)
        minv, jtau, cor = head[..., :P], head[..., P : P + D], head[..., P + D : P + 2 * D]
        s_dd = torch.randn(T, B, J, 3, generator=g).transpose(0, 1)  # batch stride < time stride
    else:
        minv = torch.randn(B, T, 2, P, generator=g)
        jtau = torch.randn(B, T, 2, D, generator=g)
        cor = torch.randn(B, T, 2, D, generator=g)
    return tuple(x.to(device=device, dtype=dtype) for x in (s_dd, minv, jtau, cor))


def naive_f64(s_dd, minv_tril, jtau, coriolis, dt, w):
    """Frame-by-frame float64 loops, written from DESIGN.md step 3 independently of the reference."""
    B, T, J, _ = s_dd.shape
    D = 3 * J
    q = s_dd.double().reshape(B, T, D)
    qdd = torch.zeros(B, T, 2, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for d in range(2):
                M = torch.zeros(D, D, dtype=torch.float64)
                for i in range(D):
                    for k in range(i + 1):
                        M[i, k] = M[k, i] = float(minv_tril[b, t, d, i * (i + 1) // 2 + k])
                qdd[b, t, d] = M @ (jtau[b, t, d].double() - coriolis[b, t, d].double())
    s_pp = q.clone()
    for b in range(B):
        for t in range(T):
            preds = []
            if t >= 2:  # forward prediction made at t-1
                preds.append(2 * q[b, t - 1] - q[b, t - 2] + qdd[b, t - 1, 0] * dt * dt)
            if t <= T - 3:  # reverse prediction made at t+1
                preds.append(2 * q[b, t + 1] - q[b, t + 2] + qdd[b, t + 1, 1] * dt * dt)
            if preds:
                s_pp[b, t] = sum(preds) / len(preds)
    s_fused = w * q + (1 - w) * s_pp
    return s_pp.reshape(B, T, J, 3), s_fused.reshape(B, T, J, 3), qdd


def assert_close(got, want, rtol, atol):
    for name, g, r in zip(("s_pp", "s_fused", "qdd"), got, want):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert torch.isfinite(g.float()).all(), name
        torch.testing.assert_close(g.float(), r.float(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------ reference
@pytest.mark.parametrize("B,T,J", [(2, 5, 2), (1, 3, 1), (1, 4, 3), (2, 7, 1)])
def test_ref_matches_naive_float64(B, T, J, gen):
    args = make_inputs(B, T, J, torch.float64, gen=gen)
    got = physnet_fused_ref(*args, DT, 0.3)
    want = naive_f64(*args, DT, 0.3)
    assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_ref_middle_frame_of_three_keeps_s_dd(gen):
    args = make_inputs(2, 3, 17, gen=gen)
    s_pp, s_fused, _ = physnet_fused_ref(*args, DT, 0.25)
    assert torch.equal(s_pp[:, 1], args[0][:, 1])
    torch.testing.assert_close(s_fused[:, 1], args[0][:, 1])


# --------------------------------------------------------------------- kernel (interpreter on CPU)
@pytest.mark.parametrize(
    "B,T,J,slots,ns",
    [
        (1, 3, 17, None, None),  # B*T = 3, the smallest legal clip
        (2, 9, 17, 1, 1),  # one slot per program: the GPU code shape (one-dimensional gather)
        (2, 9, 17, 4, 2),
        (3, 11, 5, 4, 1),  # another J
        (1, 6, 1, None, None),  # D = 3
        (1, 5, 22, None, None),  # D = 66 > 64: the next tile size
        (2, 4, 17, 2, 1),
    ],
)
def test_kernel_matches_ref_fp32(interp, gen, B, T, J, slots, ns):
    args = make_inputs(B, T, J, gen=gen)
    got = _physnet_fused_triton(*args, DT, 0.3, slots=slots, ns=ns)
    assert_close(got, physnet_fused_ref(*args, DT, 0.3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "J,shift,ns",
    [
        (17, 0, None),  # P = 1326 even: the triangles travel as int32 words
        (17, 0, 1),  # the same in the GPU code shape
        (22, 0, 1),  # P = 2211 odd: triangles start mid-word, so 16-bit elements
        (17, 1, 1),  # minv_tril one element past a word boundary: 16-bit elements
    ],
)
def test_kernel_16bit_words_and_elements(interp, gen, dtype, J, shift, ns):
    s_dd, minv, jtau, cor = make_inputs(2, 5, J, dtype, gen=gen)
    if shift:
        minv = torch.cat([torch.zeros(1, dtype=dtype), minv.flatten()])[1:].view_as(minv)
        assert minv.storage_offset() == 1
    got = _physnet_fused_triton(s_dd, minv, jtau, cor, DT, 0.3, slots=1 if ns else None, ns=ns)
    ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7
    assert_close(got, physnet_fused_ref(s_dd, minv, jtau, cor, DT, 0.3), rtol=ulp, atol=ulp)


@pytest.mark.parametrize("slots,ns,programs", [(3, 1, 2), (3, 4, None), (5, 2, 3)])
def test_kernel_uneven_chunks_and_persistent_programs(interp, gen, slots, ns, programs):
    args = make_inputs(3, 7, 5, gen=gen)
    got = _physnet_fused_triton(*args, DT, 0.4, slots=slots, ns=ns, programs=programs)
    assert_close(got, physnet_fused_ref(*args, DT, 0.4), rtol=1e-5, atol=1e-5)


def test_kernel_matches_ref_thousands_of_frames(interp, gen):
    args = make_inputs(16, 128, 17, gen=gen)  # B*T = 2048
    assert_close(physnet_fused(*args, DT, use_kernel=True), physnet_fused_ref(*args, DT), rtol=1e-5, atol=1e-5)


def test_kernel_noncontiguous_inputs(interp, gen):
    args = make_inputs(2, 7, 17, gen=gen, noncontig=True)
    assert not args[1].is_contiguous() and not args[0].is_contiguous()
    got = physnet_fused(*args, DT, 0.5, use_kernel=True)
    assert_close(got, physnet_fused_ref(*args, DT, 0.5), rtol=1e-5, atol=1e-5)


def _eager_lowp(s_dd, minv_tril, jtau, coriolis, dt, w):
    """The same math in eager PyTorch without upcasting (the yardstick of DESIGN.md convention 3)."""
    B, T, J, _ = s_dd.shape
    D = 3 * J
    r = torch.arange(D)
    hi, lo = torch.maximum(r[:, None], r[None, :]), torch.minimum(r[:, None], r[None, :])
    M = minv_tril[..., hi * (hi + 1) // 2 + lo]
    qdd = (M * (jtau - coriolis)[..., None, :]).sum(-1)
    q = s_dd.reshape(B, T, D)
    tot = torch.zeros_like(q)
    cnt = torch.zeros(1, T, 1, dtype=q.dtype)
    tot[:, 2:] += 2 * q[:, 1:-1] - q[:, :-2] + qdd[:, 1:-1, 0] * (dt * dt)
    cnt[:, 2:] += 1
    tot[:, :-2] += 2 * q[:, 1:-1] - q[:, 2:] + qdd[:, 1:-1, 1] * (dt * dt)
    cnt[:, :-2] += 1
    s_pp = torch.where(cnt > 0, tot / cnt.clamp(min=1), q)
    return s_pp.reshape(B, T, J, 3), (w * q + (1 - w) * s_pp).reshape(B, T, J, 3), qdd


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_low_precision(interp, gen, dtype):
    args = make_inputs(2, 9, 17, dtype, gen=gen)
    got = physnet_fused(*args, DT, 0.5, use_kernel=True)
    ref = physnet_fused_ref(*args, DT, 0.5)  # fp32 math, rounded once: the kernel's own contract
    ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7
    assert_close(got, ref, rtol=ulp, atol=ulp)
    # DESIGN.md convention 3: err(kernel, fp32) <= 2 err(eager in dtype, fp32) + atol
    ref32 = physnet_fused_ref(*(a.float() for a in args), DT, 0.5)
    lowp = _eager_lowp(*args, DT, 0.5)
    for g, l, r in zip(got, lowp, ref32):
        assert (g.float() - r).abs().max() <= 2 * (l.float() - r).abs().max() + 1e-3


def test_kernel_middle_frame_and_fuse_weight_edges(interp, gen):
    args = make_inputs(1, 3, 17, gen=gen)
    s_pp, s_fused, _ = physnet_fused(*args, DT, 1.0, use_kernel=True)
    assert torch.equal(s_pp[:, 1], args[0][:, 1])
    torch.testing.assert_close(s_fused, args[0], rtol=0, atol=0)  # w = 1: s_fused = s_dd
    s_pp, s_fused, _ = physnet_fused(*args, DT, 0.0, use_kernel=True)
    torch.testing.assert_close(s_fused, s_pp, rtol=0, atol=0)  # w = 0: s_fused = s_pp


def test_kernel_reuses_a_layouts_plan_but_checks_every_call(interp, gen):
    """A second call with the same layout reuses the launch plan: it must still follow dt and the
    fuse weight, still reject bad numbers, and a new layout (a strided view) gets its own plan."""
    from fpkernels.physnet import _PLANS

    args = make_inputs(2, 5, 4, gen=gen)
    _physnet_fused_triton(*args, DT, 0.3)
    n = len(_PLANS)
    assert_close(_physnet_fused_triton(*args, 0.05, 0.9), physnet_fused_ref(*args, 0.05, 0.9), rtol=1e-5, atol=1e-5)
    assert len(_PLANS) == n
    for dt, w, name in [(math.nan, 0.3, "dt"), (DT, 1.5, "fuse_weight")]:
        with pytest.raises(ValueError, match=f"^{name}:"):
            _physnet_fused_triton(*args, dt, w)
    s_dd, minv, jtau, cor = args
    wide = torch.randn(2, 5, 2, 2 * minv.shape[-1], generator=gen)
    wide[..., ::2] = minv
    strided = (s_dd, wide[..., ::2], jtau, cor)  # same shape, last stride 2
    assert_close(_physnet_fused_triton(*strided, DT, 0.3), physnet_fused_ref(*args, DT, 0.3), rtol=1e-5, atol=1e-5)
    assert len(_PLANS) == n + 1


def test_kernel_rejects_float64(interp, gen):
    with pytest.raises(ValueError, match="^s_dd:"):
        physnet_fused(*make_inputs(1, 4, 2, torch.float64, gen=gen), DT, use_kernel=True)


def test_dispatch_on_cpu_uses_the_reference(gen, monkeypatch):
    """Routing: on CPU tensors the default never enters the kernel path (made to raise here)."""
    import fpkernels.physnet as mod

    def kernel(*a, **k):
        raise AssertionError("the Triton path was taken for CPU tensors")

    monkeypatch.setattr(mod, "_physnet_fused_triton", kernel)
    args = make_inputs(2, 5, 17, gen=gen)
    want = physnet_fused_ref(*args, DT, 0.5)
    for got in (physnet_fused(*args, DT), physnet_fused(*args, DT, use_kernel=False)):
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    with pytest.raises(AssertionError, match='Triton path'):  # the patch is live: forcing it enters it
        physnet_fused(*args, DT, use_kernel=True)


# --------------------------------------------------------------------------------- bad arguments
def _bad_cases():
    B, T, J = 2, 5, 4
    D, P = 3 * J, 3 * J * (3 * J + 1) // 2
    ok = make_inputs(B, T, J)

    def with_(i, x):
        a = list(ok)
        a[i] = x
        return tuple(a)

    yield "s_dd", with_(0, torch.randn(B, T, J * 3)), {}  # wrong rank
    yield "s_dd", with_(0, torch.randn(B, T, J, 2)), {}  # wrong last dim
    yield "s_dd", make_inputs(B, 2, J), {}  # T < 3
    yield "s_dd", tuple(a.int() for a in ok), {}  # unsupported dtype
    yield "minv_tril", with_(1, torch.randn(B, T, 2, P - 1)), {}
    yield "minv_tril", with_(1, torch.randn(B + 1, T, 2, P)), {}  # mismatched batch
    yield "minv_tril", with_(1, ok[1].half()), {}  # mismatched dtype
    yield "jtau", with_(2, torch.randn(B, T, 1, D)), {}
    yield "jtau", with_(2, torch.randn(B, T, 2, D)[None]), {}  # wrong rank
    yield "coriolis", with_(3, torch.randn(B, T - 1, 2, D)), {}
    yield "coriolis", with_(3, ok[3].numpy()), {}
    for dt in (0.0, -0.1, math.nan, math.inf, None, True):
        yield "dt", ok, {"dt": dt}
    for w in (-0.1, 1.5, math.nan, "0.5"):
        yield "fuse_weight", ok, {"fuse_weight": w}


@pytest.mark.parametrize("use_kernel", [False, True])
@pytest.mark.parametrize("name,args,kw", list(_bad_cases()))
def test_bad_arguments_raise_value_error_naming_them(name, args, kw, use_kernel):
    dt = kw.get("dt", DT)
    w = kw.get("fuse_weight", 0.5)
    with pytest.raises(ValueError, match=f"^{name}:"):
        physnet_fused(*args, dt, w, use_kernel=use_kernel)


# ---------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "B,T,J,noncontig",
    [(1, 32, 17, False), (1024, 32, 17, False), (3, 3, 17, False), (5, 37, 5, False), (2, 9, 22, False),
     (4, 16, 17, True), (2, 1000, 17, False)],
)
def test_gpu_kernel_matches_ref(B, T, J, noncontig, dtype, gen):
    args = make_inputs(B, T, J, dtype, "cuda", gen=gen, noncontig=noncontig)
    got = physnet_fused(*args, DT, 0.5)  # default dispatch: the kernel on CUDA
    ref = physnet_fused_ref(*args, DT, 0.5)
    tol = {torch.float32: 2e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    assert_close(got, ref, rtol=tol, atol=tol)
    direct = _physnet_fused_triton(*args, DT, 0.5)
    for g, d in zip(got, direct):
        assert torch.equal(g, d)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "slots,num_warps,programs,maxnreg",
    [(8, 2, None, None), (31, 4, None, None), (4, 2, 7, 96), (2, 4, 100, None), (1, 2, None, 255)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_kernel_configs(slots, num_warps, programs, maxnreg, dtype, gen):
    args = make_inputs(8, 29, 17, dtype, device="cuda", gen=gen)
    got = _physnet_fused_triton(*args, DT, 0.3, slots=slots, num_warps=num_warps, programs=programs, maxnreg=maxnreg)
    tol = 2e-5 if dtype == torch.float32 else 2.0**-10
    assert_close(got, physnet_fused_ref(*args, DT, 0.3), rtol=tol, atol=tol)


@pytest.mark.gpu
def test_gpu_cached_launches_follow_alignment_sizes_and_scalars(gen):
    """The second and later calls go through ``fpkernels.launch.Launcher``'s cached path: results must
    still follow every argument (other sizes, a 2-byte-offset view, other dt and fuse weight)."""
    from fpkernels.physnet import _launch_physnet

    cases = []
    for B, T, dt, w in [(2, 16, DT, 0.5), (2, 16, 0.02, 0.25), (1, 16, DT, 0.5), (3, 17, 0.05, 0.9)]:
        cases.append((make_inputs(B, T, 17, device="cuda", gen=gen), dt, w))
    s_dd, minv, jtau, cor = make_inputs(2, 16, 17, torch.float16, "cuda", gen=gen)
    shifted = torch.empty(minv.numel() + 1, device="cuda", dtype=minv.dtype)[1:].view_as(minv)
    shifted.copy_(minv)  # same values, data pointer 2 bytes past a 16-byte boundary
    cases.append(((s_dd, shifted, jtau, cor), DT, 0.5))
    cases.append(((s_dd, minv, jtau, cor), DT, 0.5))
    for _ in range(3):  # the first pass compiles, later passes replay the cached kernels
        for args, dt, w in cases:
            tol = 2e-5 if args[0].dtype == torch.float32 else 2.0**-10
            assert_close(physnet_fused(*args, dt, w), physnet_fused_ref(*args, dt, w), rtol=tol, atol=tol)
    assert len(_launch_physnet.compiled) >= 3


@pytest.mark.gpu
@pytest.mark.parametrize("J,caps", [(17, (72, 128)), (17, (40, 128)), (21, (64, 72, 96, 128))])
def test_gpu_register_caps_take_the_first_build_without_spills(J, caps, gen):
    """A tuple of register caps: the launcher keeps the first build that spills nothing (72 registers
    suffice for fp16 at J = 17 with Triton 3.6's ptxas, 40 never do), and the results stay exact."""
    from fpkernels.physnet import _launch_physnet

    args = make_inputs(3, 9, J, torch.float16, device="cuda", gen=gen)
    for _ in range(2):  # the build, then the cached launch
        got = _physnet_fused_triton(*args, DT, 0.3, maxnreg=caps)
        assert_close(got, physnet_fused_ref(*args, DT, 0.3), rtol=2.0**-10, atol=2.0**-10)
    # launch keys: (device, (spec = (B, T, J, strides...), alignments), constexprs, options)
    kept = [c for k, c in _launch_physnet.compiled.items()
            if ("maxnreg", caps) in k[3] and k[1][0][:3] == (3, 9, J)]
    assert len(kept) == 1 and kept[0].n_regs <= caps[-1]
    if caps == (72, 128):
        assert kept[0].n_spills == 0 and kept[0].n_regs <= 72
    if caps[0] == 40:  # 40 registers spill: a larger cap was kept
        assert kept[0].n_regs > 40


# ------------------------------------------------------------------------------- bank model
def test_reverse_triangle_offset_and_bank_model():
    """fp32: the reverse triangle starts 16 banks past a bank boundary; 16-bit: the triangles are
    interleaved. The bank model (checked against Nsight Compute, benchmarks/RESULTS.md) says both
    beat the side-by-side copy."""
    from benchmarks.physnet_bank_model import gather_wavefronts, interleaved_wavefronts
    from fpkernels.physnet import _reverse_start

    for n, per_bank in [(663, 1), (1326, 1), (561, 2), (1008, 1), (6, 1)]:
        r0 = _reverse_start(n, per_bank)
        assert n <= r0 < n + 32 * per_bank and (r0 // per_bank) % 32 == 16
    D, P = 51, 1326
    assert gather_wavefronts(D, 2, P) - 204 == 161 and gather_wavefronts(D, 4, P) - 204 == 221
    assert gather_wavefronts(D, 4, _reverse_start(P, 1)) - 204 == 39
    assert interleaved_wavefronts(D) - 102 == 44
    side_by_side_offset = gather_wavefronts(D, 2, 2 * _reverse_start(P // 2, 1))
    assert interleaved_wavefronts(D) < side_by_side_offset < gather_wavefronts(D, 2, P)

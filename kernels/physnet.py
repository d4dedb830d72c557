"""PhysNet's physics step, fused (DESIGN.md steps 3 and 4).

Shapes: B clips, T >= 3 frames, J joints, D = 3J, P = D(D+1)/2.

    q         = s_dd reshaped (B,T,D), joint-major (index 3*j + c)
    M^-1      = symmetric, stored as its row-major lower triangle: minv_tril[..., i*(i+1)/2 + k], k <= i
    f         = jtau - coriolis                                   (B,T,2,D); direction 0 forward, 1 reverse
    qdd[t,d]  = M^-1[t,d] @ f[t,d]                                for every frame t and both d
    q_fwd[t+1] = 2 q[t] - q[t-1] + qdd[t,0] dt^2                  t in 1..T-2  (exists for frames 2..T-1)
    q_rev[t-1] = 2 q[t] - q[t+1] + qdd[t,1] dt^2                  t in 1..T-2  (exists for frames 0..T-3)
    s_pp[t]   = mean of the predictions that exist for frame t; s_dd[t] if none (middle frame when T = 3)
    s_fused   = w s_dd + (1 - w) s_pp

``physnet_fused`` returns ``(s_pp (B,T,J,3), s_fused (B,T,J,3), qdd (B,T,2,D))`` in the input dtype
(fp32, fp16 or bf16 inputs, all four of one dtype; the math runs in fp32 and only the outputs are
rounded, so ``qdd`` is rounded once and ``s_pp`` is computed from the unrounded fp32 ``qdd``).
``physnet_fused_ref`` is the plain-torch ground truth with the same signature and contract.

The Triton kernel does everything in one launch: each program owns a run of ``BLOCK_T`` frames of one
clip (plus one halo frame on each side, of which only one direction is read), loads each frame's
packed triangle as three ``HALF x HALF`` register tiles (top-left triangle, bottom-left square,
bottom-right triangle; rows of the packed triangle are contiguous, so every load is coalesced and
each stored number is read once), forms ``M f = L f + L^T f - diag(L) f`` with row and column
reductions of the same tiles, and integrates, averages and fuses as it slides over the frames.
"""
import functools
import math
import numbers
import os

import torch

try:  # kernels/ imports only torch and triton; triton is optional off Linux
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# argument checks (shared by the kernel and the reference)
# --------------------------------------------------------------------------------------------------
def _check_physnet_args(s_dd, minv_tril, jtau, coriolis, dt, fuse_weight):
    """Validate; return (B, T, J, D). Every error is a ValueError whose message starts with the argument."""
    for name, x in (("s_dd", s_dd), ("minv_tril", minv_tril), ("jtau", jtau), ("coriolis", coriolis)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if s_dd.dim() != 4 or s_dd.shape[-1] != 3 or s_dd.shape[2] < 1:
        raise ValueError(f"s_dd: expected shape (B,T,J,3), got {tuple(s_dd.shape)}")
    B, T, J, _ = s_dd.shape
    if T < 3:
        raise ValueError(f"s_dd: PhysNet needs T >= 3 frames (one-sided predictions at both ends), got T={T}")
    if s_dd.dtype not in _DTYPES:
        raise ValueError(f"s_dd: expected dtype float32, float16 or bfloat16, got {s_dd.dtype}")
    D = 3 * J
    P = D * (D + 1) // 2
    for name, x, shape in (
        ("minv_tril", minv_tril, (B, T, 2, P)),
        ("jtau", jtau, (B, T, 2, D)),
        ("coriolis", coriolis, (B, T, 2, D)),
    ):
        if tuple(x.shape) != shape:
            raise ValueError(
                f"{name}: expected shape (B,T,2,{'D(D+1)/2' if name == 'minv_tril' else 'D'}) = {shape} "
                f"for s_dd of shape {tuple(s_dd.shape)} (D = 3J = {D}), got {tuple(x.shape)}"
            )
        if x.dtype != s_dd.dtype:
            raise ValueError(f"{name}: expected dtype {s_dd.dtype} (the dtype of s_dd), got {x.dtype}")
        if x.device != s_dd.device:
            raise ValueError(f"{name}: expected device {s_dd.device} (the device of s_dd), got {x.device}")
    if isinstance(dt, bool) or not isinstance(dt, numbers.Real) or not math.isfinite(dt) or dt <= 0:
        raise ValueError(f"dt: expected a finite number > 0 (1/fps), got {dt!r}")
    if (
        isinstance(fuse_weight, bool)
        or not isinstance(fuse_weight, numbers.Real)
        or not (0.0 <= fuse_weight <= 1.0)
    ):
        raise ValueError(f"fuse_weight: expected a number in [0, 1], got {fuse_weight!r}")
    return B, T, J, D


# --------------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------------
def _tril_index(D, device):
    """(D,D) index of M[i,k] in the packed row-major lower triangle: max*(max+1)/2 + min."""
    r = torch.arange(D, device=device)
    hi = torch.maximum(r[:, None], r[None, :])
    lo = torch.minimum(r[:, None], r[None, :])
    return hi * (hi + 1) // 2 + lo


def physnet_fused_ref(s_dd, minv_tril, jtau, coriolis, dt, fuse_weight=0.5):
    """Plain-torch reference: fp32 math, outputs in the input dtype. Returns (s_pp, s_fused, qdd)."""
    B, T, J, D = _check_physnet_args(s_dd, minv_tril, jtau, coriolis, dt, fuse_weight)
    dtype = s_dd.dtype
    q = s_dd.float().reshape(B, T, D)
    minv = minv_tril.float()[..., _tril_index(D, s_dd.device)]  # (B,T,2,D,D), symmetric
    f = jtau.float() - coriolis.float()  # (B,T,2,D)
    qdd = torch.matmul(minv, f.unsqueeze(-1)).squeeze(-1)  # (B,T,2,D)
    dt2 = float(dt) * float(dt)
    # predictions made at t = 1..T-2: forward lands on t+1 (frames 2..T-1), reverse on t-1 (frames 0..T-3)
    q_fwd = 2 * q[:, 1:-1] - q[:, :-2] + qdd[:, 1:-1, 0] * dt2
    q_rev = 2 * q[:, 1:-1] - q[:, 2:] + qdd[:, 1:-1, 1] * dt2
    total = torch.zeros_like(q)
    count = torch.zeros(1, T, 1, device=q.device, dtype=q.dtype)
    total[:, 2:] += q_fwd
    count[:, 2:] += 1
    total[:, :-2] += q_rev
    count[:, :-2] += 1
    s_pp = torch.where(count > 0, total / count.clamp(min=1), q)
    w = float(fuse_weight)
    s_fused = w * q + (1.0 - w) * s_pp
    return (
        s_pp.reshape(B, T, J, 3).to(dtype),
        s_fused.reshape(B, T, J, 3).to(dtype),
        qdd.to(dtype),
    )


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _physnet_fused_fwdrev_kernel(
        spp_ptr, sfused_ptr, qdd_ptr,  # outputs: (B,T,D), (B,T,D), (B,T,2,D), contiguous
        q_ptr, minv_ptr, jtau_ptr, cor_ptr,  # inputs: (B,T,D), (B,T,2,P), (B,T,2,D), (B,T,2,D); last dim unit stride
        q_sb, q_st,  # s_dd strides (batch, time)
        m_sb, m_st, m_sd,  # minv_tril strides (batch, time, direction)
        j_sb, j_st, j_sd,  # jtau strides
        c_sb, c_st, c_sd,  # coriolis strides
        T, n_chunks, dt2, w, w_pp,  # frames per clip, programs per clip, dt^2, w, 1 - w
        D: tl.constexpr,  # 3J
        HALF: tl.constexpr,  # power of two, 2*HALF >= D: rows/cols [0,HALF) are "lo", [HALF,2*HALF) "hi"
        BLOCK_T: tl.constexpr,  # frames per program
    ):
        pid = tl.program_id(0)
        b = (pid // n_chunks).to(tl.int64)
        t0 = ((pid % n_chunks) * BLOCK_T).to(tl.int64)
        t1 = tl.minimum(t0 + BLOCK_T, T)

        r = tl.arange(0, HALF)
        ri = r[:, None]
        ck = r[None, :]
        # packed triangle, three HALF x HALF tiles: element (i, k), k <= i, lives at i*(i+1)/2 + k
        ib = ri + HALF
        off_tl = ri * (ri + 1) // 2 + ck  # rows lo, cols lo (triangle)
        msk_tl = (ck <= ri) & (ri < D)
        off_bl = ib * (ib + 1) // 2 + ck  # rows hi, cols lo (square)
        msk_bl = ib < D
        off_br = ib * (ib + 1) // 2 + ck + HALF  # rows hi, cols hi (triangle)
        msk_br = (ck <= ri) & (ib < D)
        rh = r + HALF
        off_dlo = r * (r + 1) // 2 + r  # diagonal, lo and hi halves
        off_dhi = rh * (rh + 1) // 2 + rh
        v_lo = r < D
        v_hi = rh < D

        zero = tl.zeros([HALF], dtype=tl.float32)
        a0_lo_p1 = zero  # qdd[u-1, forward]
        a0_hi_p1 = zero
        a0_lo_p2 = zero  # qdd[u-2, forward]
        a0_hi_p2 = zero

        for step in range(0, t1 - t0 + 2):
            u = t0 - 1 + step  # int64 frame index, t0-1 .. t1
            in_clip = (u >= 0) & (u < T)
            a0_lo = zero
            a0_hi = zero
            a1_lo = zero
            a1_hi = zero
            for d in tl.static_range(2):
                if d == 0:  # forward: needed for frames [t0-1, t1) (frame t0-1 predicts frame t0)
                    need = in_clip & (u < t1)
                else:  # reverse: needed for frames [t0, t1] (frame t1 predicts frame t1-1)
                    need = in_clip & (u >= t0)
                y_lo = zero
                y_hi = zero
                if need:  # uniform branch: halo frames read one direction only
                    mp = minv_ptr + b * m_sb + u * m_st + d * m_sd
                    L_tl = tl.load(mp + off_tl, mask=msk_tl, other=0.0).to(tl.float32)
                    L_bl = tl.load(mp + off_bl, mask=msk_bl, other=0.0).to(tl.float32)
                    L_br = tl.load(mp + off_br, mask=msk_br, other=0.0).to(tl.float32)
                    dg_lo = tl.load(mp + off_dlo, mask=v_lo, other=0.0).to(tl.float32)
                    dg_hi = tl.load(mp + off_dhi, mask=v_hi, other=0.0).to(tl.float32)
                    jp = jtau_ptr + b * j_sb + u * j_st + d * j_sd
                    cp = cor_ptr + b * c_sb + u * c_st + d * c_sd
                    # f = jtau - coriolis
                    f_lo = tl.load(jp + r, mask=v_lo, other=0.0).to(tl.float32) - tl.load(
                        cp + r, mask=v_lo, other=0.0
                    ).to(tl.float32)
                    f_hi = tl.load(jp + rh, mask=v_hi, other=0.0).to(tl.float32) - tl.load(
                        cp + rh, mask=v_hi, other=0.0
                    ).to(tl.float32)
                    # qdd = M f = L f + L^T f - diag(L) f  (L: lower triangle incl. diagonal)
                    y_lo = (
                        tl.sum(L_tl * f_lo[None, :], axis=1)
                        + tl.sum(L_tl * f_lo[:, None], axis=0)
                        + tl.sum(L_bl * f_hi[:, None], axis=0)
                        - dg_lo * f_lo
                    )
                    y_hi = (
                        tl.sum(L_bl * f_lo[None, :], axis=1)
                        + tl.sum(L_br * f_hi[None, :], axis=1)
                        + tl.sum(L_br * f_hi[:, None], axis=0)
                        - dg_hi * f_hi
                    )
                    if (u >= t0) & (u < t1):  # this program's frame: write qdd[u, d]
                        qp = qdd_ptr + (b * T + u) * (2 * D) + d * D
                        tl.store(qp + r, y_lo.to(qdd_ptr.dtype.element_ty), mask=v_lo)
                        tl.store(qp + rh, y_hi.to(qdd_ptr.dtype.element_ty), mask=v_hi)
                if d == 0:
                    a0_lo = y_lo
                    a0_hi = y_hi
                else:
                    a1_lo = y_lo
                    a1_hi = y_hi

            # frame e = u - 1: forward prediction from qdd[e-1, 0] (= a0 two steps back), if e >= 2;
            # reverse prediction from qdd[e+1, 1] (= a1 now), if e <= T-3; s_pp = mean of those that exist
            e = u - 1
            if (e >= t0) & (e < t1):
                qb = q_ptr + b * q_sb + e * q_st
                q_lo = tl.load(qb + r, mask=v_lo, other=0.0).to(tl.float32)
                q_hi = tl.load(qb + rh, mask=v_hi, other=0.0).to(tl.float32)
                tot_lo = zero
                tot_hi = zero
                n_pred = tl.zeros([], dtype=tl.float32)
                if e >= 2:  # q_fwd[e] = 2 q[e-1] - q[e-2] + qdd[e-1, 0] dt^2
                    qm1_lo = tl.load(qb - q_st + r, mask=v_lo, other=0.0).to(tl.float32)
                    qm1_hi = tl.load(qb - q_st + rh, mask=v_hi, other=0.0).to(tl.float32)
                    qm2_lo = tl.load(qb - 2 * q_st + r, mask=v_lo, other=0.0).to(tl.float32)
                    qm2_hi = tl.load(qb - 2 * q_st + rh, mask=v_hi, other=0.0).to(tl.float32)
                    tot_lo = 2.0 * qm1_lo - qm2_lo + a0_lo_p2 * dt2
                    tot_hi = 2.0 * qm1_hi - qm2_hi + a0_hi_p2 * dt2
                    n_pred = n_pred + 1.0
                if e <= T - 3:  # q_rev[e] = 2 q[e+1] - q[e+2] + qdd[e+1, 1] dt^2
                    qp1_lo = tl.load(qb + q_st + r, mask=v_lo, other=0.0).to(tl.float32)
                    qp1_hi = tl.load(qb + q_st + rh, mask=v_hi, other=0.0).to(tl.float32)
                    qp2_lo = tl.load(qb + 2 * q_st + r, mask=v_lo, other=0.0).to(tl.float32)
                    qp2_hi = tl.load(qb + 2 * q_st + rh, mask=v_hi, other=0.0).to(tl.float32)
                    tot_lo = tot_lo + (2.0 * qp1_lo - qp2_lo + a1_lo * dt2)
                    tot_hi = tot_hi + (2.0 * qp1_hi - qp2_hi + a1_hi * dt2)
                    n_pred = n_pred + 1.0
                spp_lo = q_lo
                spp_hi = q_hi
                if n_pred > 0.0:  # the middle frame of a 3-frame clip has no prediction: keeps s_dd
                    spp_lo = tot_lo / n_pred
                    spp_hi = tot_hi / n_pred
                # s_fused = w s_dd + (1 - w) s_pp
                sf_lo = w * q_lo + w_pp * spp_lo
                sf_hi = w * q_hi + w_pp * spp_hi
                ob = (b * T + e) * D
                ty = spp_ptr.dtype.element_ty
                tl.store(spp_ptr + ob + r, spp_lo.to(ty), mask=v_lo)
                tl.store(spp_ptr + ob + rh, spp_hi.to(ty), mask=v_hi)
                tl.store(sfused_ptr + ob + r, sf_lo.to(ty), mask=v_lo)
                tl.store(sfused_ptr + ob + rh, sf_hi.to(ty), mask=v_hi)

            a0_lo_p2 = a0_lo_p1
            a0_hi_p2 = a0_hi_p1
            a0_lo_p1 = a0_lo
            a0_hi_p1 = a0_hi


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def _interpreted(jit_fn):
    """The interpreter twin of a kernel that was decorated before TRITON_INTERPRET=1 was set."""
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(jit_fn.fn)


def _kernel_for(kernel, device):
    """The launchable kernel for ``device``: the compiled one on CUDA, the interpreter on the CPU."""
    if triton is None:
        raise ValueError("use_kernel: triton is not installed; pass use_kernel=False (the reference)")
    if device.type == "cuda":
        return kernel
    if not _interpreting():
        raise ValueError(
            f"use_kernel: the Triton kernel needs CUDA tensors (got {device}) or TRITON_INTERPRET=1"
        )
    if type(kernel).__name__ == "InterpretedFunction":
        return kernel
    return _interpreted(kernel)  # triton was imported before TRITON_INTERPRET=1 was set


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pick_block_t(B, T, device):
    """Largest power of two <= 32 frames per program that still gives about four programs per SM."""
    target = 4 * (_sm_count(device.index or 0) if device.type == "cuda" else 132)
    bt = 32
    while bt > 1 and B * triton.cdiv(T, bt) < target:
        bt //= 2
    return min(bt, triton.next_power_of_2(T))


def _unit_last(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _physnet_fused_triton(s_dd, minv_tril, jtau, coriolis, dt, fuse_weight, block_t=None, num_warps=4):
    B, T, J, D = _check_physnet_args(s_dd, minv_tril, jtau, coriolis, dt, fuse_weight)
    kernel = _kernel_for(_physnet_fused_fwdrev_kernel, s_dd.device)
    q = s_dd.reshape(B, T, D)  # a view whenever (J,3) are contiguous
    q = _unit_last(q)
    minv_tril, jtau, coriolis = _unit_last(minv_tril), _unit_last(jtau), _unit_last(coriolis)
    n = B * T * D
    n_pad = triton.cdiv(n, 64) * 64  # one allocation; every output starts 128-byte aligned
    out = torch.empty((2 * n_pad + 2 * n,), device=s_dd.device, dtype=s_dd.dtype)
    s_pp, s_fused, qdd = out[:n], out[n_pad : n_pad + n], out[2 * n_pad :]
    bt = block_t or _pick_block_t(B, T, s_dd.device)
    n_chunks = triton.cdiv(T, bt)
    half = max(triton.next_power_of_2(D) // 2, 1)
    w = float(fuse_weight)
    kernel[(B * n_chunks,)](
        s_pp, s_fused, qdd,
        q, minv_tril, jtau, coriolis,
        q.stride(0), q.stride(1),
        minv_tril.stride(0), minv_tril.stride(1), minv_tril.stride(2),
        jtau.stride(0), jtau.stride(1), jtau.stride(2),
        coriolis.stride(0), coriolis.stride(1), coriolis.stride(2),
        T, n_chunks, float(dt) * float(dt), w, 1.0 - w,
        D=D, HALF=half, BLOCK_T=bt, num_warps=num_warps,
    )
    return s_pp.view(B, T, J, 3), s_fused.view(B, T, J, 3), qdd.view(B, T, 2, D)


def physnet_fused(s_dd, minv_tril, jtau, coriolis, dt, fuse_weight=0.5, *, use_kernel=None):
    """PhysNet integration + fusion; returns (s_pp, s_fused, qdd). See the module docstring.

    ``use_kernel``: None = the Triton kernel on CUDA tensors, the reference elsewhere; True = the
    kernel (CUDA, or CPU under TRITON_INTERPRET=1); False = the reference.
    """
    if use_kernel is None:
        use_kernel = isinstance(s_dd, torch.Tensor) and s_dd.is_cuda and triton is not None
    if use_kernel:
        return _physnet_fused_triton(s_dd, minv_tril, jtau, coriolis, dt, fuse_weight)
    return physnet_fused_ref(s_dd, minv_tril, jtau, coriolis, dt, fuse_weight)

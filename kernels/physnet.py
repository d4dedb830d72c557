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

The Triton kernel does everything in one launch with no recomputation. Clip ``b`` has ``T + 2`` slots
``e`` in ``[-1, T]``; slot ``e`` computes the forward ``qdd`` of frame ``e-1`` and the reverse ``qdd`` of
frame ``e+1`` (so every (frame, direction) is solved exactly once) and from those two the
prediction(s), the average and the fusion for frame ``e``. On the GPU each one-warp program takes one
slot (straight-line code); the interpreter takes whole chunks of slots as one tensor step. Each solve reads the packed
triangle once, as three ``HALF x HALF`` register tiles (top-left triangle, bottom-left square,
bottom-right triangle; rows of the packed triangle are contiguous, so the loads are coalesced), and
forms ``M f = L f + L^T f - diag(L) f`` from row and column sums of the same tiles. The tiles are
shaped ``[HALF/KL, HALF, KL]`` so that a warp's lanes form a 4 x 8 grid over (rows, columns): that
keeps both reductions to a few shuffles per element instead of a full 32-lane butterfly per row.
"""
import math
import numbers

import torch

from .launch import Launcher, cdiv as _cdiv, next_pow2 as _next_pow2

try:  # kernels/ imports only torch and triton; triton is optional off Linux
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the kernel's; the reference also takes float64


# --------------------------------------------------------------------------------------------------
# argument checks (shared by the kernel and the reference)
# --------------------------------------------------------------------------------------------------
def _check_physnet_args(s_dd, minv_tril, jtau, coriolis, dt, fuse_weight, dtypes=_DTYPES + (torch.float64,)):
    """Validate; return (B, T, J, D). Every error is a ValueError whose message starts with the argument."""
    for name, x in (("s_dd", s_dd), ("minv_tril", minv_tril), ("jtau", jtau), ("coriolis", coriolis)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if s_dd.dim() != 4 or s_dd.shape[-1] != 3 or s_dd.shape[2] < 1:
        raise ValueError(f"s_dd: expected shape (B,T,J,3), got {tuple(s_dd.shape)}")
    B, T, J, _ = s_dd.shape
    if T < 3:
        raise ValueError(f"s_dd: PhysNet needs T >= 3 frames (one-sided predictions at both ends), got T={T}")
    if s_dd.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"s_dd: expected dtype {names}, got {s_dd.dtype}")
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
    """Plain-torch reference: fp32 math (fp64 for fp64 inputs), outputs in the input dtype.

    Returns (s_pp, s_fused, qdd).
    """
    B, T, J, D = _check_physnet_args(s_dd, minv_tril, jtau, coriolis, dt, fuse_weight)
    dtype = s_dd.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q = s_dd.to(acc).reshape(B, T, D)
    minv = minv_tril.to(acc)[..., _tril_index(D, s_dd.device)]  # (B,T,2,D,D), symmetric
    f = jtau.to(acc) - coriolis.to(acc)  # (B,T,2,D)
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
    def _load_f(j_ptr, c_ptr, idx, ok, D: tl.constexpr):
        """f = jtau - coriolis at element ``idx`` (any shape), 0 where idx is out of [0, D) or not ok."""
        m = ok & (idx >= 0) & (idx < D)
        return tl.load(j_ptr + idx, mask=m, other=0.0).to(tl.float32) - tl.load(c_ptr + idx, mask=m, other=0.0).to(
            tl.float32)

    @triton.jit
    def _symv_packed(m_ptr, j_ptr, c_ptr, ok, D: tl.constexpr, HALF: tl.constexpr, KL: tl.constexpr):
        """qdd = M^-1 (jtau - coriolis) for NS (frame, direction) rows at once.

        m_ptr, j_ptr, c_ptr: [NS] row pointers into minv_tril, jtau, coriolis; ok: [NS] rows to compute.
        Returns y[:, :HALF], y[:, HALF:] as two [NS, HALF] fp32 tensors.
        M^-1 = L + L^T - diag(L), L the packed lower triangle (element (i,k), k <= i, at i*(i+1)/2 + k),
        read once as three HALF x HALF tiles laid out [NS, HALF/KL, HALF, KL] (k = kb*KL + kl): top-left
        triangle, bottom-left square, bottom-right triangle. Row sums give L f, column sums L^T f.
        """
        KB: tl.constexpr = HALF // KL
        kb = tl.arange(0, KB)[None, :, None, None]
        ii = tl.arange(0, HALF)[None, None, :, None]
        kl = tl.arange(0, KL)[None, None, None, :]
        k = kb * KL + kl  # [1,KB,1,KL]
        ib = ii + HALF
        mp = m_ptr[:, None, None, None]
        ok4 = ok[:, None, None, None]
        # f = jtau - coriolis, indexed by row (i) and by column (k)
        r = tl.arange(0, HALF)[None, :]
        rh = r + HALF
        ok2 = ok[:, None]
        f_lo = _load_f(j_ptr[:, None], c_ptr[:, None], r, ok2, D)
        f_hi = _load_f(j_ptr[:, None], c_ptr[:, None], rh, ok2, D)
        dg_lo = tl.load(m_ptr[:, None] + (r * (r + 1) // 2 + r), mask=ok2 & (r < D), other=0.0).to(tl.float32)
        dg_hi = tl.load(m_ptr[:, None] + (rh * (rh + 1) // 2 + rh), mask=ok2 & (rh < D), other=0.0).to(tl.float32)
        NS: tl.constexpr = f_lo.shape[0]
        fk_lo = tl.reshape(f_lo, [NS, KB, KL])[:, :, None, :]
        fk_hi = tl.reshape(f_hi, [NS, KB, KL])[:, :, None, :]
        fi_lo = f_lo[:, None, :, None]
        fi_hi = f_hi[:, None, :, None]
        L_tl = tl.load(mp + (ii * (ii + 1) // 2 + k), mask=ok4 & (k <= ii) & (ii < D), other=0.0).to(tl.float32)
        L_bl = tl.load(mp + (ib * (ib + 1) // 2 + k), mask=ok4 & (ib < D) & (k < HALF), other=0.0).to(tl.float32)
        L_br = tl.load(mp + (ib * (ib + 1) // 2 + k + HALF), mask=ok4 & (k <= ii) & (ib < D), other=0.0).to(
            tl.float32)
        # (L f)[i]: reduce over k (registers first, then lanes)
        row_lo = tl.sum(tl.sum(L_tl * fk_lo, axis=1), axis=2)
        row_hi = tl.sum(tl.sum(L_bl * fk_lo + L_br * fk_hi, axis=1), axis=2)
        # (L^T f)[k]: reduce over i
        col_lo = tl.reshape(tl.sum(L_tl * fi_lo + L_bl * fi_hi, axis=2), [NS, HALF])
        col_hi = tl.reshape(tl.sum(L_br * fi_hi, axis=2), [NS, HALF])
        y_lo = row_lo + col_lo - dg_lo * f_lo
        y_hi = row_hi + col_hi - dg_hi * f_hi
        return y_lo, y_hi

    @triton.jit
    def _physnet_slots_step(
        e, live, b,  # [NS] slot indices, [NS] live flags, clip index
        spp_ptr, sfused_ptr, qdd_ptr, q_ptr, minv_ptr, jtau_ptr, cor_ptr,
        q_sb, q_st, m_sb, m_st, m_sd, j_sb, j_st, j_sd, c_sb, c_st, c_sd,
        T, dt2, w, w_pp, D: tl.constexpr, HALF: tl.constexpr, KL: tl.constexpr,
    ):
        """Slots e of clip b: qdd[e-1, fwd], qdd[e+1, rev], then s_pp and s_fused of frame e."""
        r = tl.arange(0, HALF)[None, :]
        rh = r + HALF
        v_lo = r < D
        v_hi = rh < D
        # forward row: frame e-1
        uf = e - 1
        okf = live & (uf >= 0) & (uf < T)
        a0_lo, a0_hi = _symv_packed(
            minv_ptr + b * m_sb + uf * m_st, jtau_ptr + b * j_sb + uf * j_st,
            cor_ptr + b * c_sb + uf * c_st, okf, D, HALF, KL)
        qp = qdd_ptr + ((b * T + uf) * (2 * D))[:, None]
        tl.store(qp + r, a0_lo.to(qdd_ptr.dtype.element_ty), mask=okf[:, None] & v_lo)
        tl.store(qp + rh, a0_hi.to(qdd_ptr.dtype.element_ty), mask=okf[:, None] & v_hi)
        # reverse row: frame e+1
        ur = e + 1
        okr = live & (ur >= 0) & (ur < T)
        a1_lo, a1_hi = _symv_packed(
            minv_ptr + b * m_sb + ur * m_st + m_sd, jtau_ptr + b * j_sb + ur * j_st + j_sd,
            cor_ptr + b * c_sb + ur * c_st + c_sd, okr, D, HALF, KL)
        qp = qdd_ptr + ((b * T + ur) * (2 * D) + D)[:, None]
        tl.store(qp + r, a1_lo.to(qdd_ptr.dtype.element_ty), mask=okr[:, None] & v_lo)
        tl.store(qp + rh, a1_hi.to(qdd_ptr.dtype.element_ty), mask=okr[:, None] & v_hi)
        # integration, averaging and fusion for frame e
        ok = (live & (e >= 0) & (e < T))[:, None]
        has_f = ok & (e >= 2)[:, None]
        has_r = ok & (e <= T - 3)[:, None]
        qb = q_ptr + (b * q_sb + e * q_st)[:, None]
        q_lo = tl.load(qb + r, mask=ok & v_lo, other=0.0).to(tl.float32)
        q_hi = tl.load(qb + rh, mask=ok & v_hi, other=0.0).to(tl.float32)
        qm1_lo = tl.load(qb - q_st + r, mask=has_f & v_lo, other=0.0).to(tl.float32)
        qm1_hi = tl.load(qb - q_st + rh, mask=has_f & v_hi, other=0.0).to(tl.float32)
        qm2_lo = tl.load(qb - 2 * q_st + r, mask=has_f & v_lo, other=0.0).to(tl.float32)
        qm2_hi = tl.load(qb - 2 * q_st + rh, mask=has_f & v_hi, other=0.0).to(tl.float32)
        qp1_lo = tl.load(qb + q_st + r, mask=has_r & v_lo, other=0.0).to(tl.float32)
        qp1_hi = tl.load(qb + q_st + rh, mask=has_r & v_hi, other=0.0).to(tl.float32)
        qp2_lo = tl.load(qb + 2 * q_st + r, mask=has_r & v_lo, other=0.0).to(tl.float32)
        qp2_hi = tl.load(qb + 2 * q_st + rh, mask=has_r & v_hi, other=0.0).to(tl.float32)
        zero = tl.zeros_like(q_lo)
        tot_lo = tl.where(has_f, 2.0 * qm1_lo - qm2_lo + a0_lo * dt2, zero) + tl.where(
            has_r, 2.0 * qp1_lo - qp2_lo + a1_lo * dt2, zero)
        tot_hi = tl.where(has_f, 2.0 * qm1_hi - qm2_hi + a0_hi * dt2, zero) + tl.where(
            has_r, 2.0 * qp1_hi - qp2_hi + a1_hi * dt2, zero)
        n_pred = has_f.to(tl.float32) + has_r.to(tl.float32)
        spp_lo = tl.where(n_pred > 0.0, tot_lo / tl.maximum(n_pred, 1.0), q_lo)
        spp_hi = tl.where(n_pred > 0.0, tot_hi / tl.maximum(n_pred, 1.0), q_hi)
        sf_lo = w * q_lo + w_pp * spp_lo
        sf_hi = w * q_hi + w_pp * spp_hi
        ob = ((b * T + e) * D)[:, None]
        ty = spp_ptr.dtype.element_ty
        tl.store(spp_ptr + ob + r, spp_lo.to(ty), mask=ok & v_lo)
        tl.store(spp_ptr + ob + rh, spp_hi.to(ty), mask=ok & v_hi)
        tl.store(sfused_ptr + ob + r, sf_lo.to(ty), mask=ok & v_lo)
        tl.store(sfused_ptr + ob + rh, sf_hi.to(ty), mask=ok & v_hi)


    @triton.jit
    def _physnet_fused_slots_kernel(
        spp_ptr, sfused_ptr, qdd_ptr,  # outputs: (B,T,D), (B,T,D), (B,T,2,D), contiguous
        q_ptr, minv_ptr, jtau_ptr, cor_ptr,  # inputs: (B,T,D), (B,T,2,P), (B,T,2,D), (B,T,2,D); last dim unit stride
        q_sb, q_st,  # s_dd strides (batch, time)
        m_sb, m_st, m_sd,  # minv_tril strides (batch, time, direction)
        j_sb, j_st, j_sd,  # jtau strides
        c_sb, c_st, c_sd,  # coriolis strides
        T, n_chunks, n_slots, n_items,  # frames per clip, chunks per clip, slots per chunk, B * n_chunks
        dt2, w, w_pp,  # dt^2, w, 1 - w
        D: tl.constexpr,  # 3J
        HALF: tl.constexpr,  # power of two with 2*HALF >= D
        KL: tl.constexpr,  # tile columns per lane group (power of two <= HALF)
        NS: tl.constexpr,  # slots computed together (a tensor dimension; 1 on the GPU)
        LOOP: tl.constexpr,  # False: one program per work item and n_slots <= NS (straight-line code)
    ):
        # Slot e in [-1, T] of clip b owns qdd[e-1, forward] and qdd[e+1, reverse] (so each (frame,
        # direction) is solved exactly once over the clip) and s_pp/s_fused[e] for 0 <= e < T, which
        # need exactly those two:
        #   q_fwd[e] = 2 q[e-1] - q[e-2] + qdd[e-1,0] dt^2   (exists for e >= 2)
        #   q_rev[e] = 2 q[e+1] - q[e+2] + qdd[e+1,1] dt^2   (exists for e <= T-3)
        #   s_pp[e] = mean of those that exist, else s_dd[e];  s_fused[e] = w s_dd[e] + (1-w) s_pp[e]
        # Work item = (clip, chunk of n_slots consecutive slots).
        if LOOP:  # programs stride over the items (persistent when there are fewer programs)
            for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
                b = (item // n_chunks).to(tl.int64)
                s0 = ((item % n_chunks) * n_slots).to(tl.int64)
                for j in range(0, tl.cdiv(n_slots, NS)):
                    sl = j * NS + tl.arange(0, NS)
                    _physnet_slots_step(
                        s0 - 1 + sl, sl < n_slots, b, spp_ptr, sfused_ptr, qdd_ptr, q_ptr, minv_ptr, jtau_ptr,
                        cor_ptr, q_sb, q_st, m_sb, m_st, m_sd, j_sb, j_st, j_sd, c_sb, c_st, c_sd, T, dt2, w,
                        w_pp, D, HALF, KL)
        else:
            item = tl.program_id(0)
            b = (item // n_chunks).to(tl.int64)
            s0 = ((item % n_chunks) * n_slots).to(tl.int64)
            sl = tl.arange(0, NS)
            _physnet_slots_step(
                s0 - 1 + sl, sl < n_slots, b, spp_ptr, sfused_ptr, qdd_ptr, q_ptr, minv_ptr, jtau_ptr, cor_ptr,
                q_sb, q_st, m_sb, m_st, m_sd, j_sb, j_st, j_sd, c_sb, c_st, c_sd, T, dt2, w, w_pp, D, HALF, KL)


_launch_physnet = Launcher(_physnet_fused_slots_kernel) if triton is not None else None


def _unit_last(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _physnet_fused_triton(s_dd, minv_tril, jtau, coriolis, dt, fuse_weight, slots=None, kl=None, ns=None,
                          num_warps=None, programs=None, maxnreg=None):
    """Launch the fused kernel. ``slots``: slots per work item; ``kl``: tile columns per lane group;
    ``ns``: slots per tensor step (1 on the GPU; whole items in the interpreter); ``programs``: grid
    size (None = one program per work item; fewer = persistent programs striding over the items);
    ``maxnreg``: register cap per thread (CUDA only).
    """
    B, T, J, D = _check_physnet_args(s_dd, minv_tril, jtau, coriolis, dt, fuse_weight, _DTYPES)
    q = _unit_last(s_dd.reshape(B, T, D))  # a view whenever (J,3) are contiguous
    minv_tril, jtau, coriolis = _unit_last(minv_tril), _unit_last(jtau), _unit_last(coriolis)
    n = B * T * D  # one allocation for the three outputs (a small call is host-bound)
    out = torch.empty(4 * n, device=s_dd.device, dtype=s_dd.dtype)
    s_pp, s_fused, qdd = out[:n].view(B, T, J, 3), out[n : 2 * n].view(B, T, J, 3), out[2 * n :].view(B, T, 2, D)
    half = max(_next_pow2(D) // 2, 1)
    on_gpu = s_dd.device.type == "cuda"
    if slots is None:  # the interpreter pays per program and per operation, not per element
        # GPU: one slot per one-warp program, straight-line code (fastest of the configurations timed
        # on an H100, benchmarks/RESULTS.md)
        slots = 1 if on_gpu else min(_next_pow2(T + 2), 256)
    if ns is None:
        ns = 1 if on_gpu else _next_pow2(slots)
    kl = kl or min(half, 8)
    if num_warps is None:  # one warp per program up to J = 21: no cross-warp reductions
        num_warps = max(1, min(8, half * half // 1024))
    n_chunks = _cdiv(T + 2, slots)  # slots e = -1 .. T
    n_items = B * n_chunks
    grid = min(programs or n_items, n_items)
    loop = grid < n_items or slots > ns
    w = float(fuse_weight)
    extra = {"maxnreg": maxnreg} if maxnreg and on_gpu else {}
    qs, ms, js, cs = q.stride(), minv_tril.stride(), jtau.stride(), coriolis.stride()
    _launch_physnet(
        (grid,),
        (s_pp, s_fused, qdd, q, minv_tril, jtau, coriolis,
         qs[0], qs[1], ms[0], ms[1], ms[2], js[0], js[1], js[2], cs[0], cs[1], cs[2],
         T, n_chunks, slots, n_items, float(dt) * float(dt), w, 1.0 - w),
        {"D": D, "HALF": half, "KL": kl, "NS": ns, "LOOP": loop},
        spec=(B, T, J, qs, ms, js, cs, grid, slots), num_warps=num_warps, **extra,
    )
    return s_pp, s_fused, qdd


def physnet_fused(s_dd, minv_tril, jtau, coriolis, dt, fuse_weight=0.5, *, use_kernel=None):
    """PhysNet integration + fusion; returns (s_pp, s_fused, qdd). See the module docstring.

    ``use_kernel``: None = the Triton kernel on CUDA tensors, the reference elsewhere; True = the
    kernel (CUDA, or CPU under TRITON_INTERPRET=1); False = the reference.
    """
    if use_kernel is None:  # the kernel on CUDA for the dtypes it supports; the reference otherwise
        use_kernel = (
            isinstance(s_dd, torch.Tensor) and s_dd.is_cuda and s_dd.dtype in _DTYPES and triton is not None
        )
    if use_kernel:
        return _physnet_fused_triton(s_dd, minv_tril, jtau, coriolis, dt, fuse_weight)
    return physnet_fused_ref(s_dd, minv_tril, jtau, coriolis, dt, fuse_weight)

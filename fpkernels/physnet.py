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
prediction(s), the average and the fusion for frame ``e``. On the GPU each two-warp program takes one
slot (straight-line code); the interpreter takes whole chunks of slots as one tensor step.

A solve is bound by the SM's load/store pipe, not by DRAM or arithmetic, so the kernel spends as few
load/store instructions as it can (benchmarks/RESULTS.md has the profiles). Both packed triangles
of a slot are read flat and contiguous (coalesced), copied to shared memory by ``tl.gather``, and the
full symmetric ``M^-1[k, i] = L[max(i,k), min(i,k)]`` is gathered from that copy into a tile whose
columns ``i`` sit on lanes and rows ``k`` in registers, so ``qdd_i = sum_k M^-1[k, i] f_k`` is a sum in
registers: no shuffles, no transposes and no separate diagonal term. 16-bit inputs (read as int32
words, two elements per load, where alignment allows) are interleaved first: element ``p`` of the
forward and of the reverse triangle share one int32, so a single 4-byte gather fetches both
matrices' entries (half the gathers of one per element, and fewer bank conflicts). fp32 keeps the
triangles side by side, the reverse one 16 banks past the forward one, with lanes alternating
between the directions (benchmarks/physnet_bank_model.py models the bank conflicts of both).
"""
import torch

from fpkernels.launch import Launcher, cdiv as _cdiv, next_pow2 as _next_pow2
from fpkernels.physnet_ref import (  # noqa: F401 (the checks and the reference, re-exported)
    _DTYPES, _check_numbers, _check_physnet_args, _check_tensors, _is_real, _tril_index, physnet_fused_ref,
)

try:  # fpkernels/ imports only torch and triton; triton is optional off Linux
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _load_f(j_ptr, c_ptr, idx, ok, D: tl.constexpr):
        """f = jtau - coriolis at element ``idx`` >= 0 (any shape), 0 where idx >= D or not ok."""
        m = ok & (idx < D)
        return tl.load(j_ptr + idx, mask=m, other=0.0).to(tl.float32) - tl.load(c_ptr + idx, mask=m, other=0.0).to(
            tl.float32)

    @triton.jit
    def _packed(k, i):
        """Index of M^-1[k, i] = L[max, min] in the packed row-major lower triangle (k, i >= 0):
        max(i(i+1)/2 + k, k(k+1)/2 + i), written k + i + max(i(i-1)/2, k(k-1)/2). With k a register
        index (a constant) that is one max against an immediate, and k + i rides in the address."""
        return k + i + tl.maximum(i * (i - 1) // 2, k * (k - 1) // 2)

    @triton.jit
    def _gather(src, idx, NS: tl.constexpr):
        """src [NS, N] gathered at idx (any shape, the same for every row), flat: [NS, idx.numel]."""
        n: tl.constexpr = idx.numel
        if NS == 1:  # the GPU path: Triton 3.6 lowers a gather across warps only in one dimension
            g = tl.reshape(tl.gather(tl.reshape(src, [src.numel]), tl.reshape(idx, [n]), 0), [1, n])
        else:
            g = tl.gather(src, tl.broadcast_to(tl.reshape(idx, [1, n]), [NS, n]), 1)
        return g

    @triton.jit
    def _solve_pair(mf_ptr, mr_ptr, jf_ptr, jr_ptr, cf_ptr, cr_ptr, okf, okr,
                    D: tl.constexpr, DP: tl.constexpr, SW: tl.constexpr, R0: tl.constexpr, WORDS: tl.constexpr,
                    PAIRS: tl.constexpr):
        """M^-1 (jtau - coriolis) for NS (forward, reverse) pairs; returns (y_fwd, y_rev), [NS, DP] fp32.

        mf_ptr/mr_ptr: [NS] pointers to the two packed triangles; jf/jr/cf/cr: [NS] pointers to the
        jtau and coriolis rows; okf/okr: [NS] which rows exist.
        PAIRS (16-bit inputs, read as int16, or as int32 words of two elements when WORDS): element p
        of both triangles is packed into one int32 (forward low, reverse high), so one gather of a
        [NS, DP(k), DP(i)] tile of those fetches both matrices.
        Otherwise (fp32): both triangles are loaded flat into one [NS, SW] tensor, the reverse one
        from element R0, and gathered as a [NS, DP(k), DP(i), 2] tile.
        """
        P: tl.constexpr = D * (D + 1) // 2
        NE: tl.constexpr = P // 2 if WORDS else P  # source units (words or elements) per triangle
        NS: tl.constexpr = okf.shape[0]
        w = tl.arange(0, SW)[None, :]
        # rows and columns past D repeat the last one: finite values that f (zero past D) or the masked
        # stores discard, and no address outside the triangle
        kr = tl.minimum(tl.arange(0, DP), D - 1)
        kk = tl.arange(0, DP)[None, :]
        ff = _load_f(jf_ptr[:, None], cf_ptr[:, None], kk, okf[:, None], D)  # [NS, DP(k)]
        fr = _load_f(jr_ptr[:, None], cr_ptr[:, None], kk, okr[:, None], D)
        if PAIRS:
            a = tl.load(mf_ptr[:, None] + w, mask=(w < NE) & okf[:, None], other=0)
            b = tl.load(mr_ptr[:, None] + w, mask=(w < NE) & okr[:, None], other=0)
            if WORDS:  # words (low element first): pair up the low halves, then the high halves
                lo = (a & 0xFFFF) | (b << 16)
                hi = ((a >> 16) & 0xFFFF) | (b & -65536)
                src = tl.reshape(tl.join(lo, hi), [NS, 2 * SW])
            else:
                src = (a.to(tl.int32) & 0xFFFF) | (b.to(tl.int32) << 16)
            g = tl.reshape(_gather(src, _packed(kr[:, None], kr[None, :]), NS), [NS, DP, DP])  # int32 [k, i]
            ty = jf_ptr.dtype.element_ty
            gf = g.to(tl.int16).to(ty, bitcast=True).to(tl.float32)
            gr = (g >> 16).to(tl.int16).to(ty, bitcast=True).to(tl.float32)
            return tl.sum(gf * ff[:, :, None], axis=1), tl.sum(gr * fr[:, :, None], axis=1)
        in_f = w < NE
        in_r = (w >= R0) & (w < R0 + NE)
        src = tl.load(tl.where(in_f, mf_ptr[:, None] + w, mr_ptr[:, None] + (w - R0)),
                      mask=(in_f & okf[:, None]) | (in_r & okr[:, None]), other=0)
        d = tl.arange(0, 2)[None, None, :]
        g = tl.reshape(_gather(src, d * R0 + _packed(kr[:, None, None], kr[None, :, None]), NS), [NS, DP, DP, 2])
        f = tl.join(ff, fr)  # [NS, DP(k), 2]
        return tl.split(tl.sum(g * f[:, :, None, :], axis=1))

    @triton.jit
    def _physnet_slots_step(
        e, live, b,  # [NS] slot indices, [NS] live flags, clip index
        spp_ptr, sfused_ptr, qdd_ptr, q_ptr, minv_ptr, jtau_ptr, cor_ptr,
        q_sb, q_st, m_sb, m_st, m_sd, j_sb, j_st, j_sd, c_sb, c_st, c_sd,
        T, dt2, w, w_pp, D: tl.constexpr, DP: tl.constexpr, SW: tl.constexpr, R0: tl.constexpr,
        WORDS: tl.constexpr, PAIRS: tl.constexpr,
    ):
        """Slots e of clip b: qdd[e-1, fwd], qdd[e+1, rev], then s_pp and s_fused of frame e."""
        r = tl.arange(0, DP)[None, :]
        v = r < D
        ty = spp_ptr.dtype.element_ty
        uf = e - 1
        okf = live & (uf >= 0) & (uf < T)
        ur = e + 1
        okr = live & (ur >= 0) & (ur < T)
        a0, a1 = _solve_pair(
            minv_ptr + b * m_sb + uf * m_st, minv_ptr + b * m_sb + ur * m_st + m_sd,
            jtau_ptr + b * j_sb + uf * j_st, jtau_ptr + b * j_sb + ur * j_st + j_sd,
            cor_ptr + b * c_sb + uf * c_st, cor_ptr + b * c_sb + ur * c_st + c_sd, okf, okr, D, DP, SW, R0, WORDS,
            PAIRS)
        tl.store(qdd_ptr + ((b * T + uf) * (2 * D))[:, None] + r, a0.to(ty), mask=okf[:, None] & v)
        tl.store(qdd_ptr + ((b * T + ur) * (2 * D) + D)[:, None] + r, a1.to(ty), mask=okr[:, None] & v)
        # integration, averaging and fusion for frame e
        ok = (live & (e >= 0) & (e < T))[:, None]
        has_f = ok & (e >= 2)[:, None]
        has_r = ok & (e <= T - 3)[:, None]
        qb = q_ptr + (b * q_sb + e * q_st)[:, None] + r
        q0 = tl.load(qb, mask=ok & v, other=0.0).to(tl.float32)
        qm1 = tl.load(qb - q_st, mask=has_f & v, other=0.0).to(tl.float32)
        qm2 = tl.load(qb - 2 * q_st, mask=has_f & v, other=0.0).to(tl.float32)
        qp1 = tl.load(qb + q_st, mask=has_r & v, other=0.0).to(tl.float32)
        qp2 = tl.load(qb + 2 * q_st, mask=has_r & v, other=0.0).to(tl.float32)
        zero = tl.zeros_like(q0)
        tot = tl.where(has_f, 2.0 * qm1 - qm2 + a0 * dt2, zero) + tl.where(has_r, 2.0 * qp1 - qp2 + a1 * dt2, zero)
        # the mean of the predictions that exist (halving is exact), s_dd where there is none
        spp = tl.where(has_f & has_r, 0.5 * tot, tl.where(has_f | has_r, tot, q0))
        ob = ((b * T + e) * D)[:, None] + r
        tl.store(spp_ptr + ob, spp.to(ty), mask=ok & v)
        tl.store(sfused_ptr + ob, (w * q0 + w_pp * spp).to(ty), mask=ok & v)

    @triton.jit
    def _physnet_fused_slots_kernel(
        spp_ptr, sfused_ptr, qdd_ptr,  # outputs: (B,T,D), (B,T,D), (B,T,2,D), contiguous
        q_ptr, minv_ptr, jtau_ptr, cor_ptr,  # inputs: (B,T,D), (B,T,2,P), (B,T,2,D), (B,T,2,D); last dim unit stride
        # (minv_ptr as int32 words when WORDS, its strides then in words)
        q_sb, q_st,  # s_dd strides (batch, time)
        m_sb, m_st, m_sd,  # minv_tril strides (batch, time, direction)
        j_sb, j_st, j_sd,  # jtau strides
        c_sb, c_st, c_sd,  # coriolis strides
        T, n_chunks, n_slots, n_items,  # frames per clip, chunks per clip, slots per chunk, B * n_chunks
        dt2, w, w_pp,  # dt^2, w, 1 - w
        D: tl.constexpr,  # 3J
        DP: tl.constexpr,  # power of two >= D
        SW: tl.constexpr,  # power of two holding one triangle's words or elements (PAIRS), else both triangles
        # (the second from R0)
        R0: tl.constexpr,  # where the reverse triangle starts in that tensor (fp32)
        WORDS: tl.constexpr,  # minv_ptr holds int32 words of two 16-bit elements
        PAIRS: tl.constexpr,  # 16-bit inputs: the two triangles are interleaved element by element
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
                        w_pp, D, DP, SW, R0, WORDS, PAIRS)
        else:
            item = tl.program_id(0)
            b = (item // n_chunks).to(tl.int64)
            s0 = ((item % n_chunks) * n_slots).to(tl.int64)
            sl = tl.arange(0, NS)
            _physnet_slots_step(
                s0 - 1 + sl, sl < n_slots, b, spp_ptr, sfused_ptr, qdd_ptr, q_ptr, minv_ptr, jtau_ptr, cor_ptr,
                q_sb, q_st, m_sb, m_st, m_sd, j_sb, j_st, j_sd, c_sb, c_st, c_sd, T, dt2, w, w_pp, D, DP, SW, R0, WORDS,
                PAIRS)


_launch_physnet = Launcher(_physnet_fused_slots_kernel) if triton is not None else None


def _reverse_start(n, per_bank):
    """First element of the reverse triangle in the kernel's shared copy: at least ``n`` (the forward
    triangle's elements), 16 banks past a 32-bank boundary; ``per_bank``: elements per 4-byte bank."""
    return n + (16 * per_bank - n % (32 * per_bank)) % (32 * per_bank)


class _Plan:
    """Everything a launch needs that follows from the inputs' shapes, strides, dtypes and devices and
    from the launch options: worked out (and the inputs validated) once per layout, then reused."""

    __slots__ = ("dims", "copy", "view", "ints", "consts", "spec", "grid", "options")

    def __init__(self, s_dd, minv_tril, jtau, coriolis, slots, ns, num_warps, programs, maxnreg):
        B, T, J, D = self.dims = _check_tensors(s_dd, minv_tril, jtau, coriolis, _DTYPES)
        # the kernel needs unit stride along the last dimension; s_dd as (B,T,D) is a view whenever
        # (J,3) are contiguous
        q = s_dd.reshape(B, T, D)
        self.copy = tuple(x.stride(-1) != 1 for x in (q, minv_tril, jtau, coriolis))
        q, m, jtau, coriolis = (x.contiguous() if c else x for x, c in zip((q, minv_tril, jtau, coriolis), self.copy))
        P = D * (D + 1) // 2
        # 16-bit inputs: the kernel interleaves the two triangles element by element (one gather fetches
        # both), reading them as int32 words (two elements per load) when every triangle starts on a
        # word: an even P, even strides and an even storage offset; fp32: the reverse triangle starts
        # 16 banks after the forward one in the shared copy (lanes alternate directions, so their
        # gathers fall on opposite halves of the banks; benchmarks/physnet_bank_model.py)
        pairs = m.element_size() == 2
        words = pairs and P % 2 == 0 and m.storage_offset() % 2 == 0 and all(st % 2 == 0 for st in m.stride()[:3])
        self.view = (torch.int32 if words else torch.int16) if pairs else None
        if pairs:
            m = m.view(self.view)
        ne = P // 2 if words else P  # source units (words or elements) per triangle
        r0 = 0 if pairs else _reverse_start(P, 1)
        dp = _next_pow2(D)
        on_gpu = s_dd.device.type == "cuda"
        if slots is None:  # the interpreter pays per program and per operation, not per element
            slots = 1 if on_gpu else min(_next_pow2(T + 2), 256)
        if ns is None:  # the interpreter's tensors stay under Triton's 2**20 elements
            ns = 1 if on_gpu else min(_next_pow2(slots), max(1, (1 << 20) // (2 * dp * dp)))
        n_chunks = _cdiv(T + 2, slots)  # slots e = -1 .. T
        n_items = B * n_chunks
        self.grid = (min(programs or n_items, n_items),)
        qs, ms, js, cs = q.stride(), m.stride(), jtau.stride(), coriolis.stride()
        self.ints = (qs[0], qs[1], ms[0], ms[1], ms[2], js[0], js[1], js[2], cs[0], cs[1], cs[2],
                     T, n_chunks, slots, n_items)
        self.consts = {"D": D, "DP": dp, "SW": _next_pow2(r0 + ne), "R0": r0, "WORDS": words, "PAIRS": pairs,
                       "NS": ns, "LOOP": self.grid[0] < n_items or slots > ns}
        self.spec = (B, T, J, qs, ms, js, cs, self.grid, slots)
        # two warps per slot: the fastest on an H100 and an H200 (benchmarks/RESULTS.md). Register cap:
        # 16-bit programs hold one column per thread and fit in 64-72 registers for most J, which
        # nearly doubles the programs per SM against 128 (fp16, J = 17, H200, 32768 frames: 77.6 us at
        # 72 registers, 81.7 us at 64 where it spills 8 bytes, 93.9 us at 128); the lowest cap whose
        # build spills nothing is taken. fp32 spills below 112.
        self.options = {"num_warps": num_warps or 2}
        if on_gpu:
            self.options["maxnreg"] = maxnreg or ((64, 72, 96, 128) if pairs else 128)


_PLANS = {}  # _Plan by the inputs' layout and the launch options


def _physnet_fused_triton(s_dd, minv_tril, jtau, coriolis, dt, fuse_weight, slots=None, ns=None, num_warps=None,
                          programs=None, maxnreg=None):
    """Launch the fused kernel. ``slots``: slots per work item; ``ns``: slots per tensor step (1 on the
    GPU; whole items in the interpreter); ``programs``: grid size (None = one program per work item;
    fewer = persistent programs striding over the items); ``maxnreg``: register cap per thread (CUDA
    only), or a tuple of caps of which the first that builds without spills is taken; by default
    (64, 72, 96, 128) for 16-bit inputs and 128 for fp32 (ptxas otherwise picks 80 and spills).

    A small call is bound by this host code, so what follows from the inputs' layout is worked out
    once per layout (``_Plan``); a layout seen before was validated then, and only ``dt`` and
    ``fuse_weight`` are checked again.
    """
    try:
        key = (s_dd.shape, s_dd.stride(), s_dd.dtype, s_dd.device, minv_tril.shape, minv_tril.stride(),
               minv_tril.storage_offset() % 2, minv_tril.dtype, minv_tril.device, jtau.shape, jtau.stride(),
               jtau.dtype, jtau.device, coriolis.shape, coriolis.stride(), coriolis.dtype, coriolis.device,
               slots, ns, num_warps, programs, maxnreg)
        plan = _PLANS.get(key)
    except (AttributeError, TypeError):  # not tensors: the full check says which argument is wrong
        key = plan = None
    if plan is None:
        plan = _Plan(s_dd, minv_tril, jtau, coriolis, slots, ns, num_warps, programs, maxnreg)
        if key is not None:
            if len(_PLANS) >= 1024:
                _PLANS.clear()
            _PLANS[key] = plan
    _check_numbers(dt, fuse_weight)
    B, T, J, D = plan.dims
    cq, cm, cj, cc = plan.copy
    q = s_dd.reshape(B, T, D)
    q = q.contiguous() if cq else q
    m = minv_tril.contiguous() if cm else minv_tril
    m = m.view(plan.view) if plan.view is not None else m
    jtau = jtau.contiguous() if cj else jtau
    coriolis = coriolis.contiguous() if cc else coriolis
    dev, ty = s_dd.device, s_dd.dtype
    s_pp = torch.empty((B, T, J, 3), device=dev, dtype=ty)
    s_fused = torch.empty((B, T, J, 3), device=dev, dtype=ty)
    qdd = torch.empty((B, T, 2, D), device=dev, dtype=ty)
    w = float(fuse_weight)
    _launch_physnet(plan.grid,
                    (s_pp, s_fused, qdd, q, m, jtau, coriolis, *plan.ints, float(dt) * float(dt), w, 1.0 - w),
                    plan.consts, spec=plan.spec, **plan.options)
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

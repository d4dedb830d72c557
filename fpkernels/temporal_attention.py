"""Attention over short sequences: AnimateDiff's temporal self-attention.

A motion module attends over the F frames (16) of every pixel: N = B*H*W sequences (8192 at the
64x64 level of a 512x512 clip with guidance), each F tokens long. Flash-attention kernels tile the
sequence by 64-128 queries, so one 16-token sequence per thread block leaves most of each tile
empty and the launch is tens of thousands of tiny blocks. Here one program takes ``BN`` whole
sequences of one head: Q, K and V of a sequence fit in registers, the scores are one (F x F)
batched tensor-core product, the softmax is exact (no online rescaling needed), and O goes
straight into the (N, F, C) layout that the output projection reads.

    temporal_attention(q, k, v, heads) -> (N, F, C)      q, k, v: (N, F, C), last dim unit stride
    out[n, f, h*d:(h+1)*d] = softmax(q_h k_h^T / sqrt(d)) v_h      d = C / heads

``q``, ``k``, ``v`` may be views into one fused (N, F, 3C) projection output. fp32 accumulation;
fp32 inputs use IEEE fp32 products. ``temporal_attention_ref`` is the same contract in plain torch.
"""
import functools
import math

import torch

from fpkernels.launch import Launcher, cdiv as _cdiv, next_pow2 as _next_pow2

try:  # fpkernels/ imports only torch and triton; triton is optional off Linux
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_args(q, k, v, heads, dtypes=_DTYPES + (torch.float64,)):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if q.dim() != 3 or q.shape[1] < 1 or q.shape[2] < 1:
        raise ValueError(f"q: expected shape (N,F,C), got {tuple(q.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name}: expected shape {tuple(q.shape)} (that of q), got {tuple(x.shape)}")
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"{name}: expected {q.dtype} on {q.device} (as q), got {x.dtype} on {x.device}")
    if q.dtype not in dtypes:
        names = ", ".join(str(t).replace("torch.", "") for t in dtypes)
        raise ValueError(f"q: expected dtype {names}, got {q.dtype}")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or q.shape[2] % heads:
        raise ValueError(f"heads: expected a positive integer dividing C = {q.shape[2]}, got {heads!r}")


def temporal_attention_ref(q, k, v, heads):
    """Plain torch: per-head softmax attention over dim 1, fp32 math (fp64 for fp64 inputs),
    output (N,F,C) in q's dtype."""
    _check_args(q, k, v, heads)
    N, F, C = q.shape
    d = C // heads
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32

    def split(x):
        return x.to(acc).reshape(N, F, heads, d).transpose(1, 2)

    s = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d)
    o = torch.softmax(s, dim=-1) @ split(v)
    return o.transpose(1, 2).reshape(N, F, C).to(q.dtype)


if triton is not None:

    @triton.jit
    def _attend_head(o_ptr, q_ptr, k_ptr, v_ptr, n, h, N, F, C, sqn, sqf, skn, skf, svn, svf, scale_log2,
                     DH: tl.constexpr, FP: tl.constexpr, DP: tl.constexpr, IEEE: tl.constexpr):
        """Head ``h`` of the [BN,1,1] sequences ``n``: softmax(q k^T / sqrt(d)) v into o."""
        f = tl.arange(0, FP)[None, :, None]
        d = tl.arange(0, DP)[None, None, :]
        m = (n < N) & (f < F) & (d < DH)
        col = h * DH + d
        q = tl.load(q_ptr + n * sqn + f * sqf + col, mask=m, other=0.0)
        k = tl.load(k_ptr + n * skn + f * skf + col, mask=m, other=0.0)
        v = tl.load(v_ptr + n * svn + f * svf + col, mask=m, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.permute(k, (0, 2, 1)))
        s = s * scale_log2
        key_ok = tl.arange(0, FP)[None, None, :] < F
        s = tl.where(key_ok, s, float("-inf"))
        p = tl.exp2(s - tl.max(s, axis=2)[:, :, None])
        denom = tl.sum(p, axis=2)[:, :, None]
        if IEEE:
            o = tl.dot(p, v, input_precision="ieee")
        else:
            o = tl.dot(p.to(v.dtype), v)
        o = o / denom
        tl.store(o_ptr + n * F * C + f * C + col, o.to(o_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _temporal_attention_kernel(
        o_ptr, q_ptr, k_ptr, v_ptr,  # o (N,F,C) contiguous; q, k, v (N,F,C) with unit last stride
        N, F, C, sqn, sqf, skn, skf, svn, svf, scale_log2,  # sizes, strides, log2(e)/sqrt(d)
        DH: tl.constexpr, FP: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
        HEADS: tl.constexpr,  # 0: one head per program (grid axis 1); else this many heads in turn
    ):
        n = (tl.program_id(0) * BN + tl.arange(0, BN)).to(tl.int64)[:, None, None]
        if HEADS == 0:
            _attend_head(o_ptr, q_ptr, k_ptr, v_ptr, n, tl.program_id(1), N, F, C, sqn, sqf, skn, skf, svn, svf,
                         scale_log2, DH, FP, DP, IEEE)
        else:  # whole rows of the sequences pass through this program: neighbouring heads share sectors
            for h in range(HEADS):
                _attend_head(o_ptr, q_ptr, k_ptr, v_ptr, n, h, N, F, C, sqn, sqf, skn, skf, svn, svf, scale_log2,
                             DH, FP, DP, IEEE)

    @triton.jit
    def _temporal_attention_static(
        o_ptr, q_ptr, k_ptr, v_ptr, N: tl.constexpr, F: tl.constexpr, C: tl.constexpr, sqn: tl.constexpr,
        sqf: tl.constexpr, skn: tl.constexpr, skf: tl.constexpr, svn: tl.constexpr, svf: tl.constexpr,
        scale_log2: tl.constexpr, DH: tl.constexpr, FP: tl.constexpr, DP: tl.constexpr, IEEE: tl.constexpr,
        HEADS: tl.constexpr,
    ):
        """The kernel for ahead-of-time packages, whose shapes are fixed: sizes, strides and scale
        are compile-time constants (Inductor passes run-time ints without Triton's divisibility
        hints, and floats as fp64), one sequence per program walking every head."""
        n = tl.program_id(0).to(tl.int64) + tl.zeros([1, 1, 1], dtype=tl.int64)
        for h in range(HEADS):
            _attend_head(o_ptr, q_ptr, k_ptr, v_ptr, n, h, N, F, C, sqn, sqf, skn, skf, svn, svf, scale_log2,
                         DH, FP, DP, IEEE)

    _launch = Launcher(_temporal_attention_kernel)


def _kernel_inputs(q, k, v):
    """q, k, v as the kernels read them: unit last stride (a copy only where it is not)."""
    return tuple(x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))


def _scale_log2(d):
    """log2(e) / sqrt(d): the kernels' softmax runs on exp2."""
    return math.log2(math.e) / math.sqrt(d)


def _config(F, d):
    """(FP, DP, sequences per program, warps, all heads per program) for F frames, head dim d.

    One sequence per program walking all its heads, so that whole rows of q/k/v pass through one
    program: fastest at every shape of an SD 1.5 step on an H100 (`bench_attention --sweep`,
    benchmarks/RESULTS.md): 147 us against 255 us for one head per program at N=8192, d=40.
    """
    fp = max(16, _next_pow2(F))
    dp = max(16, _next_pow2(d))
    return fp, dp, 1, 4 if d <= 64 else 2, True


def _temporal_attention_triton(q, k, v, heads, bn=None, num_warps=None, all_heads=None):
    """``bn``: sequences per program; ``all_heads``: one program walks every head of its sequences
    (else one head per program); None = the timed default (``_config``)."""
    _check_args(q, k, v, heads, _DTYPES)
    N, F, C = q.shape
    d = C // heads
    out = torch.empty((N, F, C), device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    fp, dp, bn0, nw0, ah0 = _config(F, d)
    bn, num_warps = bn or bn0, num_warps or nw0
    all_heads = ah0 if all_heads is None else all_heads
    q, k, v = _kernel_inputs(q, k, v)
    args = (out, q, k, v, N, F, C, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            _scale_log2(d))
    consts = {"DH": d, "FP": fp, "DP": dp, "BN": bn, "IEEE": q.dtype == torch.float32,
              "HEADS": heads if all_heads else 0}
    _launch((_cdiv(N, bn), 1 if all_heads else heads), args, consts, num_warps=num_warps)
    return out


# An opaque operator for torch.compile: Inductor keeps the inputs' eager layout (views into the fused
# QKV projection) and the launch runs through the cached launcher (captured once into a CUDA graph).
@torch.library.custom_op("fpengine::temporal_attention", mutates_args=())
def _temporal_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    return _temporal_attention_triton(q, k, v, heads)


@_temporal_attention_op.register_fake
def _(q, k, v, heads):
    return q.new_empty(q.shape)


def _static_launch(q, k, v, heads):
    """Grid and compile-time constants of ``_temporal_attention_static`` for q, k, v (N,F,C)."""
    N, F, C = q.shape
    d = C // heads
    fp, dp, _, num_warps, _ = _config(F, d)
    return (N, 1), dict(N=N, F=F, C=C, sqn=q.stride(0), sqf=q.stride(1), skn=k.stride(0), skf=k.stride(1),
                        svn=v.stride(0), svf=v.stride(1), scale_log2=_scale_log2(d), DH=d, FP=fp,
                        DP=dp, IEEE=q.dtype == torch.float32, HEADS=heads, num_warps=num_warps)


@functools.cache  # registered on first use: torch.library.triton_op imports Dynamo
def _aot_op():
    """The kernel as an operator Inductor can see into: ahead-of-time compiles (AOTInductor
    packages) carry it as a compiled kernel, so a package runs without this module imported. It
    launches ``_temporal_attention_static`` (sizes, strides and scale as constants): given the
    run-time ints and the fp64 scale Inductor passes, the same kernel ran 4-7x slower in a package
    than under torch.compile (H200: 706 against 174 us at N=8192, C=320; 177 us now)."""
    if triton is None or not hasattr(torch.library, "triton_op"):
        raise ValueError("use_kernel='aot': needs triton and torch.library.triton_op")

    @torch.library.triton_op("fpengine::temporal_attention_aot", mutates_args=())
    def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        if out.numel() == 0:
            return out
        q, k, v = _kernel_inputs(q, k, v)
        grid, consts = _static_launch(q, k, v, heads)
        torch.library.wrap_triton(_temporal_attention_static)[grid](out, q, k, v, **consts)
        return out

    return op


def temporal_attention(q, k, v, heads, *, use_kernel=None):
    """Attention over dim 1 of (N,F,C) q, k, v with ``heads`` heads; returns (N,F,C) contiguous.

    ``use_kernel``: None = the Triton kernel on CUDA tensors, the reference elsewhere; True = the
    kernel (CUDA, or CPU under TRITON_INTERPRET=1); False = the reference; "aot" = the kernel as
    an operator that ``torch.export`` and AOTInductor compile into their package (CUDA).
    """
    if use_kernel is None:
        use_kernel = isinstance(q, torch.Tensor) and q.is_cuda and triton is not None
    if use_kernel == "aot":  # for torch.export / AOTInductor (CUDA)
        _check_args(q, k, v, heads, _DTYPES)
        return _aot_op()(q, k, v, heads)
    if use_kernel:  # the operator checks its arguments (_temporal_attention_triton)
        return _temporal_attention_op(q, k, v, heads)
    return temporal_attention_ref(q, k, v, heads)

"""Every attention call of one SD 1.5 + AnimateDiff v2 UNet step, by shape and backend.

    PYTHONPATH=. python benchmarks/bench_attention.py [--size 512] [--frames 16] [--out rows.jsonl]

For each attention shape of the step (spatial self, text cross and temporal self-attention at each
UNet level; batch 2 for guidance) times PyTorch SDPA with each backend forced (flash, cuDNN,
memory-efficient) and, for the temporal shapes, ``fpkernels.temporal_attention``; inputs are views of
one fused (N, L, 3C) projection as in the UNet, fp16. Prints per-call medians (do_bench), TFLOP/s
and the per-step total (calls per step x time); never asserts.
"""
import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import bench_gpu, env_info, warm_up_gpu, write_rows
from fpkernels.temporal_attention import _temporal_attention_triton, temporal_attention

SWEEP = [(bn, nw, all_heads) for all_heads in (False, True) for bn in (1, 2, 4, 8) for nw in (1, 2, 4, 8)]
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def step_shapes(size, frames, batch=2, heads=8):
    """(kind, N, Lq, Lk, C, calls per step) for SD 1.5 + AnimateDiff v2 at ``size`` pixels."""
    s = size // 8
    levels = [(s, 320, 5, 10), (s // 2, 640, 5, 10), (s // 4, 1280, 5, 10), (s // 8, 1280, 1, 12)]
    out = []
    for res, c, spatial_calls, temporal_calls in levels:
        out.append(("spatial self", batch * frames, res * res, res * res, c, spatial_calls))
        out.append(("text cross", batch * frames, res * res, 77, c, spatial_calls))
        out.append(("temporal self", batch * res * res, frames, frames, c, temporal_calls))
    return out


def inputs(N, Lq, Lk, C, heads):
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(N, Lq, 3 * C, device="cuda", generator=g, dtype=torch.float16)
    q, k, v = qkv.chunk(3, dim=-1)
    if Lk != Lq:  # cross-attention: K and V from the 77 text tokens
        kv = torch.randn(N, Lk, 2 * C, device="cuda", generator=g, dtype=torch.float16)
        k, v = kv.chunk(2, dim=-1)
    return q, k, v


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--sweep", action="store_true",
                    help="also time other launch configurations (sequences per program, warps) of the temporal kernel")
    ap.add_argument("--out", help="append JSON rows to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU", file=sys.stderr)
        return 0
    env = env_info()
    warm_up_gpu()
    rows, best_total, sdpa_total = [], 0.0, 0.0
    for kind, N, Lq, Lk, C, calls in step_shapes(args.size, args.frames, heads=args.heads):
        h, d = args.heads, C // args.heads
        q, k, v = inputs(N, Lq, Lk, C, h)
        split = [x.unflatten(-1, (h, d)).transpose(1, 2) for x in (q, k, v)]
        flop = 4.0 * N * h * Lq * Lk * d
        cands = {}
        for name, backend in BACKENDS.items():
            def fn(backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(*split)
            try:
                fn()
                cands[f"sdpa {name}"] = bench_gpu(fn)[0]
            except RuntimeError as exc:  # the backend refuses this shape
                print(f"{kind} {N}x{Lq}x{Lk}x{C} sdpa {name}: unsupported ({str(exc).splitlines()[0][:80]})")
        cands["sdpa default"] = bench_gpu(lambda: F.scaled_dot_product_attention(*split))[0]
        if kind == "temporal self":
            cands["triton temporal"] = bench_gpu(lambda: temporal_attention(q, k, v, h))[0]
            for bn, nw, ah in SWEEP if args.sweep else ():
                name = f"triton bn={bn} warps={nw}{' all heads' if ah else ''}"
                try:
                    cands[name] = bench_gpu(
                        lambda bn=bn, nw=nw, ah=ah: _temporal_attention_triton(q, k, v, h, bn=bn, num_warps=nw,
                                                                               all_heads=ah))[0]
                except Exception as exc:  # noqa: BLE001 - a configuration this triton cannot build: report
                    print(f"{kind} {name}: {type(exc).__name__}: {str(exc)[:80]}")
        for name, us in cands.items():
            rows.append({"op": "attention", "kind": kind, "shape": f"N={N} Lq={Lq} Lk={Lk} C={C} h={h}",
                         "backend": name, "median_us": us, "tflops": flop / us / 1e6, "calls": calls,
                         "ms_per_step": us * calls / 1000, "size": args.size, **env})
            print(f"{kind:<14} N={N:<6} Lq={Lq:<5} Lk={Lk:<5} C={C:<5} x{calls:<3} {name:<16} {us:9.1f} us "
                  f"{flop / us / 1e6:7.1f} TFLOP/s  {us * calls / 1000:7.2f} ms/step", flush=True)
        best_total += min(cands.values()) * calls / 1000
        sdpa_total += cands["sdpa default"] * calls / 1000
        del q, k, v, split
    print(f"per step: sdpa default {sdpa_total:.2f} ms, best of the candidates {best_total:.2f} ms")
    if args.out:
        write_rows(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

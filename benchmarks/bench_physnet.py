"""Benchmark the fused PhysNet kernel against its eager reference and torch.compile of the reference.

    PYTHONPATH=. python benchmarks/bench_physnet.py [--out rows.jsonl] [--sweep] [--dtypes fp32,fp16]

B*T in {32, 1024, 32768} frames (clips of T = 32), J = 17. Bytes moved = every input read once and
every output written once; GB/s is compared with a device-to-device copy of the same bytes, measured
in the same run. Prints a markdown table; never asserts.
"""
import sys

import torch

from benchmarks.common import (DTYPES, bench_gpu, bench_graph, bench_wall, copy_gbps, env_info, kernel_bench_args,
                               report, timed_first_call, wall_ratio, warm_up_gpu)
from fpkernels.physnet import _physnet_fused_triton, physnet_fused, physnet_fused_ref

SHAPES = [(1, 32), (32, 32), (1024, 32)]  # (B, T): 32, 1024 and 32768 frames
J = 17
DT = 1.0 / 30.0
SWEEP = [  # (slots, num_warps, programs, maxnreg) tried at the largest shape with --sweep (default: 1, 2, all,
    # the first of 64, 72, 96, 128 registers that builds without spills for 16-bit inputs, 128 for fp32)
    (1, 2, None, 64), (1, 2, None, 72), (1, 2, None, 96), (1, 2, None, 128), (1, 4, None, None),
    (2, 2, None, None),
]


def make_inputs(B, T, dtype, seed=0):
    D = 3 * J
    P = D * (D + 1) // 2
    g = torch.Generator(device="cuda").manual_seed(seed)
    s_dd = torch.randn(B, T, J, 3, device="cuda", generator=g) * 0.3
    minv = torch.randn(B, T, 2, P, device="cuda", generator=g)
    jtau = torch.randn(B, T, 2, D, device="cuda", generator=g)
    cor = torch.randn(B, T, 2, D, device="cuda", generator=g)
    return tuple(x.to(dtype) for x in (s_dd, minv, jtau, cor))


def traffic_bytes(B, T, dtype):
    D = 3 * J
    P = D * (D + 1) // 2
    e = torch.finfo(dtype).bits // 8
    reads = B * T * (D + 2 * P + 4 * D)
    writes = B * T * (2 * D + 2 * D)
    return (reads + writes) * e


def row(env, backend, B, T, dtype_name, gpu, wall, nbytes, copy, **extra):
    med, p20, p80 = gpu
    return {
        "op": "physnet_fused", "backend": backend, "shape": f"B={B} T={T} J={J} ({B * T} frames)",
        "frames": B * T, "dtype": dtype_name, "median_us": med, "p20_us": p20, "p80_us": p80,
        "wall_us": wall[0] if wall else None, "bytes": nbytes, "gbps": nbytes / (med * 1e-6) / 1e9,
        "copy_gbps": copy, **extra, **env,
    }


def main(argv=None):
    ap = kernel_bench_args(__doc__, "other kernel configurations", "32768 frames")
    ap.add_argument("--host-profile", action="store_true",
                    help="only cProfile 2000 back-to-back 32-frame calls per dtype (where the host time goes)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_physnet: needs a CUDA GPU", file=sys.stderr)
        return 0
    if args.host_profile:
        import cProfile
        import pstats

        from fpkernels.physnet import _launch_physnet
        for dname in args.dtypes:
            x = make_inputs(*SHAPES[0], DTYPES[dname])
            physnet_fused(*x, DT, 0.5)
            torch.cuda.synchronize()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(2000):
                physnet_fused(*x, DT, 0.5)
            torch.cuda.synchronize()
            prof.disable()
            print(f"--- {dname}: {len(_launch_physnet.compiled)} compiled launch keys")
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)
        return 0
    if args.profile_once:
        for dname in args.dtypes:
            x = make_inputs(*SHAPES[-1], DTYPES[dname])
            for _ in range(2):
                physnet_fused(*x, DT, 0.5)
            torch.cuda.synchronize()
        return 0
    env = env_info()
    warm_up_gpu()
    torch._dynamo.config.cache_size_limit = 64
    compiled = torch.compile(physnet_fused_ref)
    rows = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for B, T in SHAPES:
            x = make_inputs(B, T, dtype)
            nbytes = traffic_bytes(B, T, dtype)
            copy = copy_gbps(nbytes)

            def kern():
                return physnet_fused(*x, DT, 0.5)

            backends = [
                ("triton", kern),
                ("eager", lambda: physnet_fused_ref(*x, DT, 0.5)),
            ]
            if not args.no_compile:
                backends.append(("torch.compile", lambda: compiled(*x, DT, 0.5)))
            for name, fn in backends:
                extra = {}
                if name == "torch.compile":
                    extra["compile_s"] = timed_first_call(fn)
                fn()
                rows.append(row(env, name, B, T, dname, bench_gpu(fn), bench_wall(fn), nbytes, copy,
                                graph_us=bench_graph(fn), **extra))
                r = rows[-1]
                print(f"{r['shape']:<28} {dname} {name:<14} {r['median_us']:9.1f} us"
                      f"  graph {r['graph_us'] or 0:8.1f} us"
                      f"  wall {r['wall_us']:9.1f} us"
                      f"  {r['gbps']:7.0f} GB/s  copy {copy:5.0f} GB/s", flush=True)
            if B * T == min(b * t for b, t in SHAPES):  # the launch-bound shape: paired wall-time ratio
                med, lo, hi = wall_ratio(kern, lambda: physnet_fused_ref(*x, DT, 0.5))
                rows[-len(backends)]["wall_ratio_paired"] = (med, lo, hi)
                print(f"{'':<28} {dname} triton vs eager, wall per call in alternating batches: {med:.1f}x "
                      f"(p20 {lo:.1f}x, p80 {hi:.1f}x)", flush=True)
            if args.sweep and B * T == max(b * t for b, t in SHAPES):
                for slots, nw, progs, mr in SWEEP:
                    def fn(slots=slots, nw=nw, progs=progs, mr=mr):
                        return _physnet_fused_triton(*x, DT, 0.5, slots=slots, num_warps=nw, programs=progs,
                                                     maxnreg=mr)
                    name = f"triton[slots={slots},warps={nw},programs={progs or 'all'},maxnreg={mr or 'default'}]"
                    try:
                        rows.append(row(env, name, B, T, dname, bench_gpu(fn), None, nbytes, copy))
                    except Exception as exc:  # a configuration this triton cannot build: report, go on
                        print(f"{name}: {type(exc).__name__}: {exc}", flush=True)
                        continue
                    r = rows[-1]
                    print(f"{r['shape']:<28} {dname} {name:<34} {r['median_us']:9.1f} us  {r['gbps']:7.0f} GB/s",
                          flush=True)
            del x
            torch.cuda.empty_cache()
    report(rows, args.out, "physnet_fused")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark the heatmap kernel against its eager reference and torch.compile of the reference.

    PYTHONPATH=. python benchmarks/bench_heatmap.py [--out rows.jsonl] [--sweep] [--dtypes fp32,fp16]

16 frames x 17 joints at 256^2 and 512^2, sigma 3. Bytes moved = the heatmaps written once (plus the
keypoints read); GB/s is compared with a device-to-device copy of the same bytes measured in the same
run. Also times the PixelUnshuffle(8) layout against the reference followed by pixel_unshuffle.
Prints a markdown table; never asserts.
"""
import sys

import torch

from benchmarks.common import (DTYPES, bench_gpu, bench_wall, copy_gbps, env_info, kernel_bench_args, report,
                               timed_first_call, warm_up_gpu)
from fpkernels.heatmap import _render_heatmaps_triton, render_heatmaps, render_heatmaps_ref

SIZES = [256, 512]
B, T, J, SIGMA = 1, 16, 17, 3.0
SWEEP = [(8, 512, 4), (32, 256, 8), (64, 64, 4)]  # (block_h, block_w, warps)


def make_inputs(S, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    kp = torch.rand(B, T, J, 2, device="cuda", generator=g) * S
    vis = torch.rand(B, T, J, device="cuda", generator=g) * 0.9 + 0.1
    return kp, vis


def unshuffled_ref(kp, vis, S, out_dtype, r=8):
    maps = render_heatmaps_ref(kp, vis, S, S, SIGMA, out_dtype)
    return torch.nn.functional.pixel_unshuffle(maps.reshape(B * T, J, S, S), r)


def main(argv=None):
    args = kernel_bench_args(__doc__, "other tile shapes", "512^2").parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_heatmap: needs a CUDA GPU", file=sys.stderr)
        return 0
    if args.profile_once:
        for dname in args.dtypes:
            kp, vis = make_inputs(max(SIZES))
            for _ in range(2):
                render_heatmaps(kp, vis, max(SIZES), max(SIZES), SIGMA, DTYPES[dname])
            torch.cuda.synchronize()
        return 0
    env = env_info()
    warm_up_gpu()
    torch._dynamo.config.cache_size_limit = 64
    compiled = torch.compile(render_heatmaps_ref)
    rows = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for S in SIZES:
            kp, vis = make_inputs(S)
            nbytes = B * T * J * S * S * (torch.finfo(dtype).bits // 8) + kp.numel() * 4 + vis.numel() * 4
            copy = copy_gbps(nbytes)
            shape = f"{B * T}x{J}x{S}x{S}"
            backends = [
                ("triton", lambda: render_heatmaps(kp, vis, S, S, SIGMA, dtype)),
                ("eager", lambda: render_heatmaps_ref(kp, vis, S, S, SIGMA, dtype)),
            ]
            if not args.no_compile:
                backends.append(("torch.compile", lambda: compiled(kp, vis, S, S, SIGMA, dtype)))
            backends += [
                ("triton unshuffle=8", lambda: render_heatmaps(kp, vis, S, S, SIGMA, dtype, unshuffle=8)),
                ("eager + pixel_unshuffle(8)", lambda: unshuffled_ref(kp, vis, S, dtype)),
            ]
            if args.sweep and S == max(SIZES):
                for bh, bw, nw in SWEEP:
                    def fn(bh=bh, bw=bw, nw=nw):
                        return _render_heatmaps_triton(kp, vis, S, S, SIGMA, dtype, 1, block_h=bh, block_w=bw,
                                                       num_warps=nw)
                    backends.append((f"triton[{bh}x{bw},warps={nw}]", fn))
            for name, fn in backends:
                extra = {}
                if name == "torch.compile":
                    extra["compile_s"] = timed_first_call(fn)
                fn()
                med, p20, p80 = bench_gpu(fn)
                wall = bench_wall(fn)[0] if not name.startswith("triton[") else None
                rows.append({
                    "op": "render_heatmaps", "backend": name, "shape": shape, "dtype": dname, "median_us": med,
                    "p20_us": p20, "p80_us": p80, "wall_us": wall, "bytes": nbytes,
                    "gbps": nbytes / (med * 1e-6) / 1e9, "copy_gbps": copy, **extra, **env,
                })
                print(f"{shape:<16} {dname} {name:<30} {med:9.1f} us  wall {wall or 0:9.1f} us"
                      f"  {rows[-1]['gbps']:7.0f} GB/s  copy {copy:5.0f} GB/s", flush=True)
            torch.cuda.empty_cache()
    report(rows, args.out, "render_heatmaps")
    return 0


if __name__ == "__main__":
    sys.exit(main())

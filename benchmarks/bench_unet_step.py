"""One UNet step of SD 1.5 + AnimateDiff (16 frames, classifier-free guidance = batch 2), fp16 on
CUDA: diffusers eager, torch.compile (default mode) of the same UNet, and the `triton` backend's
path, in one run on one card. Prints a table; writes JSON rows with card, versions and commit.

    PYTHONPATH=. python benchmarks/bench_unet_step.py --size 512 --modes eager,compile,fast --out r.json
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import env_info, write_rows
from finephys.model.build import build_unet
from finephys.model.presets import full_size_config
from finephys.model.unet import PoseGuidedUNet


def unet_flops(size: int, frames: int = 16) -> float:
    """Measured once by counting (torch.utils.flop_counter) is better; this is DESIGN.md's table."""
    return {256: 8.2e12, 512: 35.5e12}.get(size, float("nan"))


def time_ms(fn, reps: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def inputs(size: int, frames: int = 16, batch: int = 2, device="cuda", dtype=torch.float16):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = size // 8
    sample = torch.randn(batch, 4, frames, h, h, generator=g).to(device, dtype)
    text = torch.randn(batch * frames, 77, 768, generator=g).to(device, dtype)
    feats = [torch.randn(batch * frames, c, h >> i, h >> i, generator=g).to(device, dtype) * 0.1
             for i, c in enumerate((320, 640, 1280, 1280))]
    t = torch.tensor(500, device=device)
    return sample, t, text, feats


def meta() -> dict:
    """Card, versions and commit (benchmarks.common), plus diffusers' version."""
    import diffusers

    return {**env_info(), "diffusers": diffusers.__version__}


CATEGORIES = (  # kernel-name fragments -> where the time goes
    ("attention", ("sdpa", "flash", "fmha", "attention")),
    ("convolution", ("fprop", "conv", "implicit_gemm", "nchwtonhwc", "nhwctonchw")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "mm_")),
    ("group norm", ("group_norm", "rowwisemoments", "computefused", "native_group_norm", "red_fused")),
    ("elementwise / copies", ("elementwise", "triton_poi", "copy", "cat", "upsample", "memset")),
)


def profile(fn, path):
    """One call under torch.profiler: the top kernels and the time per category, written to path."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    totals, total = {}, 0.0
    for e in events:
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        if us <= 0:
            continue
        name = e.key.lower()
        cat = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")
        totals[cat] = totals.get(cat, 0.0) + us
        total += us
    lines = [f"{c:>22}: {v / 1e3:8.2f} ms  {100 * v / total:5.1f}%" for c, v in sorted(totals.items(), key=lambda kv: -kv[1])]
    summary = "\n".join(lines + [f"{'total':>22}: {total / 1e3:8.2f} ms"])
    with open(path, "w") as f:
        f.write(summary + "\n\n" + events.table(sort_by="self_cuda_time_total", row_limit=40))
    print(summary, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--modes", default="eager,compile,fast")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--profile", default=None, help="write the eager profile table here")
    ap.add_argument("--fast-compile-mode", default="default")
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    info = meta()
    cfg = full_size_config(lora_rank=None)
    torch.manual_seed(0)
    unet = build_unet(cfg).to("cuda", torch.float16).eval().requires_grad_(False)
    sample, t, text, feats = inputs(a.size, a.frames)
    rows = []
    flops = unet_flops(a.size, a.frames)

    def record(mode, times, compile_s=None, extra=None):
        med = statistics.median(times)
        q = statistics.quantiles(times, n=10)
        row = {"bench": "unet_step", "mode": mode, "size": a.size, "frames": a.frames, "batch": 2,
               "median_ms": med, "p20_ms": q[1], "p80_ms": q[7], "tflops": flops / med / 1e9,
               "compile_s": compile_s, **(extra or {}), **info}
        rows.append(row)
        print(f"{mode:>28} {a.size}: median {med:7.2f} ms  p20 {q[1]:7.2f}  p80 {q[7]:7.2f}  "
              f"{row['tflops']:6.1f} TFLOP/s  compile {compile_s}", flush=True)

    with torch.inference_mode():
        modes = a.modes.split(",")
        if "eager" in modes:
            record("diffusers eager", time_ms(lambda: unet(sample, t, text), a.reps))
            if a.profile:
                profile(lambda: unet(sample, t, text), a.profile + ".eager.txt")
        if "compile" in modes:
            compiled = torch.compile(unet, dynamic=False)
            t0 = time.perf_counter()
            compiled(sample, t, text)
            torch.cuda.synchronize()
            record("torch.compile default", time_ms(lambda: compiled(sample, t, text), a.reps),
                   round(time.perf_counter() - t0, 1))
            if a.profile:
                profile(lambda: compiled(sample, t, text), a.profile + ".compile.txt")
            del compiled
            torch._dynamo.reset()
        if "fast" in modes:
            from engine.cuda_graph import CudaGraphCall
            from engine.fast_unet import optimise_unet

            wrapped = PoseGuidedUNet(unet)
            fn = optimise_unet(wrapped, channels_last=not a.no_channels_last, compile_mode=a.fast_compile_mode)
            call = fn if a.no_graph else CudaGraphCall(fn)
            t0 = time.perf_counter()
            call(sample, t, text, feats)
            torch.cuda.synchronize()
            name = f"fast ({a.fast_compile_mode}{'' if a.no_channels_last else ', cl'}{'' if a.no_graph else ', graph'})"
            record(name, time_ms(lambda: call(sample, t, text, feats), a.reps), round(time.perf_counter() - t0, 1))
            if a.profile:
                profile(lambda: fn(sample, t, text, feats), a.profile + ".fast.txt")
    print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB on {info['gpu']}")
    if a.out:
        write_rows(rows, a.out)


if __name__ == "__main__":
    main()

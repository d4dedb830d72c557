"""End to end: a 16-frame clip (pose stack, text, 25 DDIM steps with guidance, VAE decode) at
256x256 and 512x512 on CUDA, full-size SD 1.5 + AnimateDiff v2 architecture (random weights: the
timing does not depend on them). Modes in one run on one card: diffusers eager fp16 (the
reference pipeline cast to fp16), torch.compile (default mode) of its UNet, and the `triton`
backend. Also the peak GPU memory of streaming 64 vs 512 frames (issue: memory bounded).
With ``--engine E`` (an engine exported with ``--compile`` for 16 frames at ``--size``), the triton
backend runs from E's weights, and mode ``packaged`` times E's AOTInductor packages (issue 19):
the steady clip time of the precompiled path against the just-in-time one, same weights, same run.

    PYTHONPATH=. python benchmarks/bench_generate.py --size 512 --out r.jsonl
    PYTHONPATH=. python benchmarks/bench_generate.py --size 512 --engine E --modes eager,triton,packaged --phases
``--phases`` adds, per mode, one clip with each kind of model call timed apart (text, heatmap
encoder, UNet steps, VAE decode, the rest).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_unet_step import meta
from benchmarks.common import write_rows
from finephys.sampler.options import GenerateOptions
from finephys.sampler.stream import generate, generate_stream
from finephys.poses.clip import load_clip, loop_clip
from finephys.model.assembly import assemble, new_parts
from finephys.model.presets import full_size_config
from finephys.model.text import load_tokenizer, write_clip_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def full_size_parts():
    tok = Path(tempfile.mkdtemp())
    write_clip_tokenizer(tok)
    with torch.device("cuda"):  # random init on the GPU: seconds instead of minutes
        return new_parts(full_size_config(lora_rank=None), load_tokenizer(tok), seed=0)


def run_clip(model, clip, opts, reps):
    times = []
    for i in range(reps + 1):  # the first run includes compilation / graph capture
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(model, clip, opts, progress=False)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[0], times[1:]


PHASES = ("encode_text", "encode_pose", "predict_noise", "decode_latents")


def phase_times(model, clip, opts) -> dict:
    """One more clip with each kind of model call timed apart (synchronised before and after, so
    the side-stream decode no longer overlaps the next window): seconds per kind, the whole clip,
    and the rest (pose stack, sampler, frames to uint8)."""
    spent = dict.fromkeys(PHASES, 0.0)

    def timed(name, fn):
        def call(*args, **kw):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            torch.cuda.synchronize()
            spent[name] += time.perf_counter() - t0
            return out
        return call

    for name in PHASES:
        setattr(model, name, timed(name, getattr(model, name)))
    try:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(model, clip, opts, progress=False)
        torch.cuda.synchronize()
        spent["clip"] = time.perf_counter() - t0
    finally:
        for name in PHASES:
            delattr(model, name)  # the instance's wrapper goes; the class's method shows again
    spent["other"] = spent["clip"] - sum(spent[n] for n in PHASES)
    return {k: round(v, 4) for k, v in spent.items()}


def top_kernels(model, clip, opts, n: int, device: str = "cuda") -> list[dict]:
    """One more clip under torch.profiler: the ``n`` GPU kernels with the most total time (kernels
    replayed inside CUDA graphs included), each with its calls, total milliseconds and share of
    all kernel time; to see where two paths' clip times part."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        generate(model, clip, opts, progress=False)
        if on_gpu:
            torch.cuda.synchronize()

    def spent(e):  # a kernel's own time on the device (the CPU's own time on the CPU)
        return e.self_device_time_total if on_gpu else e.self_cpu_time_total

    kernels = [e for e in prof.key_averages() if e.device_type.name == device.upper() and spent(e) > 0]
    total = sum(spent(e) for e in kernels) or 1.0
    kernels.sort(key=spent, reverse=True)
    return [{"name": e.key[:120], "calls": e.count, "ms": round(spent(e) / 1e3, 2),
             "share": round(spent(e) / total, 4)} for e in kernels[:n]] + \
        [{"name": "(all kernels)", "calls": sum(e.count for e in kernels), "ms": round(total / 1e3, 2), "share": 1.0}]


def stream_peak(model, clip, frames, size):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    opts = GenerateOptions("a person walking", num_frames=frames, height=size, width=size, num_inference_steps=1)
    n = sum(1 for _ in generate_stream(model, clip, opts, progress=False))
    torch.cuda.synchronize()
    return n, torch.cuda.max_memory_allocated() / 2**30


def fidelity(got, want):
    """Latent error of an approximate run against the exact one: max and mean |diff| over the mean
    |latent|, and the PSNR of its uint8 frames."""
    scale = want.latents.float().abs().mean()
    diff = (got.latents.float() - want.latents.float()).abs()
    mse = ((got.frames.astype("float64") - want.frames.astype("float64")) ** 2).mean()
    psnr = float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(255.0**2 / mse)).item()
    return {"latent_max_rel": (diff.max() / scale).item(), "latent_mean_rel": (diff.mean() / scale).item(),
            "frame_psnr_db": psnr}


def stream_time(model, clip, opts, reps):
    """Median wall seconds to consume the whole stream (all windows decoded)."""
    times = []
    for _ in range(reps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = sum(1 for _ in generate_stream(model, clip, opts, progress=False))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return n, statistics.median(times[1:])


def long_clip(frames):
    return loop_clip(load_clip(ROOT / "examples" / "walk.npz"), frames)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", default="eager,compile,triton",
                    help="eager, compile, triton, packaged, packaged-nographs (--engine; nographs: the UNet package "
                         "called directly, not replayed in a CUDA graph)")
    ap.add_argument("--engine", type=Path, default=None, help="exported engine: triton runs from its weights")
    ap.add_argument("--phases", action="store_true", help="also one clip per mode with its calls timed apart")
    ap.add_argument("--kernels", type=int, default=0, help="also one profiled clip per mode: its N costliest kernels")
    ap.add_argument("--memory", default="", help="e.g. 64,512: stream these frame counts on the triton backend")
    ap.add_argument("--deep-cache", default="", help="e.g. 2,3: also time the triton backend with these intervals")
    ap.add_argument("--deep-cache-depth", type=int, default=1)
    ap.add_argument("--overlap-frames", type=int, default=0,
                    help="stream this many frames (windows of 16, stride 12) with and without the side-stream decode")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    info = meta()
    clip = load_clip(ROOT / "examples" / "walk.npz")
    opts = GenerateOptions("a person walking in a park", num_frames=16, height=a.size, width=a.size,
                           num_inference_steps=a.steps, guidance_scale=7.5)
    modes = a.modes.split(",")
    for mode in ("packaged", "packaged-nographs"):
        if mode in modes and a.engine is None:
            ap.error(f"--modes {mode}: needs --engine (exported with --compile)")
    parts = full_size_parts() if a.engine is None or "eager" in modes or "compile" in modes else None
    rows = []

    def record(mode, first, times, extra=None, model=None):
        if a.phases and model is not None:
            extra = {**(extra or {}), "phases_s": phase_times(model, clip, opts)}
        if a.kernels and model is not None:
            extra = {**(extra or {}), "top_kernels": top_kernels(model, clip, opts, a.kernels)}
        row = {"bench": "generate", "mode": mode, "size": a.size, "frames": 16, "steps": a.steps,
               "median_s": statistics.median(times), "min_s": min(times), "first_run_s": first,
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30, **(extra or {}), **info}
        rows.append(row)
        print(f"{mode:>22} {a.size}: median {row['median_s']:.3f} s (first run {first:.1f} s, "
              f"peak {row['peak_gib']:.1f} GiB)", flush=True)
        if "phases_s" in row:
            print(f"{'':>22} phases (s): {row['phases_s']}", flush=True)
        for k in row.get("top_kernels", []):
            print(f"{'':>22} {k['ms']:9.2f} ms {k['share']:6.1%} x{k['calls']:<5} {k['name']}", flush=True)

    if "eager" in modes or "compile" in modes:
        ref = assemble(parts, device="cuda", dtype=torch.float16)
        if "eager" in modes:
            torch.cuda.reset_peak_memory_stats()
            record("diffusers eager fp16", *run_clip(ref, clip, opts, a.reps), model=ref)
        if "compile" in modes:
            ref.unet = torch.compile(ref.unet, dynamic=False)
            torch.cuda.reset_peak_memory_stats()
            record("torch.compile default", *run_clip(ref, clip, opts, a.reps))
            torch._dynamo.reset()
        del ref
    for mode, graphs in (("packaged", True), ("packaged-nographs", False)):
        if mode not in modes:
            continue
        from engine.backends.aoti import load_packaged

        packaged = load_packaged(a.engine, torch.device("cuda"), require_compiled=True, cuda_graphs=graphs)
        if packaged is None:
            raise SystemExit(f"--engine {a.engine}: no AOTInductor packages this machine can load")
        torch.cuda.reset_peak_memory_stats()
        name = "packaged (AOTInductor)" if graphs else "packaged (AOTInductor), no CUDA graph"
        record(name, *run_clip(packaged, clip, opts, a.reps), model=packaged)
        del packaged
    if "triton" in modes or a.memory:
        from engine.backends.triton import triton_from_parts

        if a.engine is not None:
            from engine.backends.triton import load_triton_backend

            fast = load_triton_backend(a.engine, "cuda")  # just in time, from the engine's weights
        else:
            fast = triton_from_parts(parts)
        if "triton" in modes or a.deep_cache:
            torch.cuda.reset_peak_memory_stats()
            record("triton backend", *run_clip(fast, clip, opts, a.reps), model=fast)
            exact = generate(fast, clip, opts, progress=False)
        for interval in [int(n) for n in a.deep_cache.split(",") if n]:
            cached = GenerateOptions(**{**opts.__dict__, "deep_cache": interval, "deep_cache_depth": a.deep_cache_depth})
            torch.cuda.reset_peak_memory_stats()
            first, times = run_clip(fast, clip, cached, a.reps)
            extra = {"deep_cache": interval, "deep_cache_depth": a.deep_cache_depth,
                     **fidelity(generate(fast, clip, cached, progress=False), exact)}
            record(f"triton + DeepCache {interval}/{a.deep_cache_depth}", first, times, extra)
            print(f"    fidelity vs triton full steps: {extra}", flush=True)
        if a.overlap_frames:
            long = long_clip(a.overlap_frames)
            lopts = GenerateOptions("a person walking", num_frames=a.overlap_frames, height=a.size, width=a.size,
                                    num_inference_steps=a.steps, context_length=16, context_stride=12)
            for on in (True, False):
                fast.async_decode = on
                n, med = stream_time(fast, long, lopts, 2)
                rows.append({"bench": "stream_decode_overlap", "mode": "side-stream decode" if on else "decode inline",
                             "size": a.size, "frames": n, "steps": a.steps, "median_s": med, **info})
                print(f"stream {n} frames, decode {'on a side stream' if on else 'inline'}: {med:.3f} s", flush=True)
            fast.async_decode = True
        for frames in [int(f) for f in a.memory.split(",") if f]:
            n, peak = stream_peak(fast, long_clip(frames), frames, a.size)
            rows.append({"bench": "stream_memory", "mode": "triton backend", "size": a.size, "frames": n,
                         "steps": 1, "peak_gib": peak, **info})
            print(f"stream {n} frames at {a.size}: peak {peak:.2f} GiB", flush=True)
    if a.out:
        write_rows(rows, a.out)


if __name__ == "__main__":
    main()

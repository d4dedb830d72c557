"""Multi-GPU timings (issue 9); never asserts. Needs as many CUDA GPUs as the largest run asks.

Single-clip latency, all runs in one launch so every number comes from the same cards:
  * 1 GPU: ``generate`` on cuda:0 (rank 0, while the other ranks wait) -- the baseline;
  * ``--parallel guidance`` over 2 GPUs (batch-1 UNet calls on each, one all_gather per step);
  * ``--parallel windows`` over N GPUs for a long clip (--long-frames), against 1 GPU on the same clip;
  * ``--parallel both`` over N >= 4 GPUs (guidance pairs x windows), same long clip.
The model is the full-size SD 1.5 + AnimateDiff v2 architecture with random weights (timing does
not depend on them; every rank seeds the same weights), fp16, on the reference backend ("eager")
or the triton backend ("triton"). Each run: one untimed first run (compilation / CUDA graphs),
then --reps timed runs, barrier and synchronize around each.

Server throughput with 1, 2, 4 replicas (--serve-replicas, needs --ckpt): runs
``benchmarks/load_serve.py --start --replicas N`` (one GPU per replica on a GPU machine) per N and
collects its summaries.

    PYTHONPATH=. python benchmarks/bench_parallel.py --size 512 --gpus 2 --backend eager,triton --out p.jsonl
    PYTHONPATH=. python benchmarks/bench_parallel.py --serve-replicas 1,2,4 --ckpt CKPT --skip-latency
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write_rows

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _model(ctx, backend: str):
    from benchmarks.bench_generate import full_size_parts
    from finephys.model.assembly import assemble

    with torch.cuda.device(ctx.device):
        parts = full_size_parts()  # seeded: the same weights on every rank
    if backend == "triton":
        from engine.backends.triton import triton_from_parts

        return triton_from_parts(parts, device=str(ctx.device))
    return assemble(parts, device=str(ctx.device), dtype=torch.float16)


def _timed(ctx, fn, reps):
    import torch.distributed as dist

    times = []
    for _ in range(reps + 1):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return times[0], times[1:]


def _latency_worker(ctx, a):
    """Every rank: the 1-GPU baseline on rank 0 (others wait at the barrier), then each parallel mode."""
    import torch.distributed as dist

    from benchmarks.bench_generate import long_clip
    from benchmarks.bench_unet_step import meta
    from engine.distributed import generate_parallel, split_layout
    from finephys.sampler.options import GenerateOptions
    from finephys.sampler.stream import generate
    from finephys.poses.clip import load_clip

    rows = []
    short = load_clip(ROOT / "examples" / "walk.npz")
    long = long_clip(a.long_frames)
    for backend in a.backend.split(","):
        model = _model(ctx, backend)
        for clip_name, clip, frames in (("16 frames", short, 16), (f"{a.long_frames} frames", long, a.long_frames)):
            opts = GenerateOptions("a person walking in a park", num_frames=frames, height=a.size, width=a.size,
                                   num_inference_steps=a.steps, guidance_scale=7.5)
            base = None
            runs = [("1 GPU", None)] + [(m, m) for m in ("guidance", "windows", "both")]
            for label, mode in runs:
                if mode is not None:
                    try:
                        split_layout(mode, ctx.world_size)
                    except ValueError:
                        continue
                    if mode == "guidance" and frames != 16:
                        continue
                    if mode != "guidance" and frames == 16:
                        continue  # one window: nothing to deal out
                if mode is None:
                    fn = (lambda: generate(model, clip, opts, progress=False)) if ctx.rank == 0 else (lambda: None)
                else:
                    fn = lambda: generate_parallel(model, clip, opts, ctx, mode, progress=False)  # noqa: E731
                first, times = _timed(ctx, fn, a.reps)
                if ctx.rank == 0:
                    med = statistics.median(times)
                    base = med if mode is None else base
                    row = {"bench": "parallel_latency", "backend": backend, "mode": label,
                           "gpus": 1 if mode is None else ctx.world_size, "clip": clip_name, "size": a.size,
                           "steps": a.steps, "median_s": med, "min_s": min(times), "first_run_s": first,
                           "speedup_vs_1gpu": base / med if base else None, **meta()}
                    rows.append(row)
                    print(f"{backend:>7} {clip_name:>10} {label:>9} x{row['gpus']}: median {med:.3f} s "
                          f"(first {first:.1f} s), {row['speedup_vs_1gpu']:.2f}x vs 1 GPU", flush=True)
        model = None  # free this backend before the next one is built
        torch.cuda.empty_cache()
        dist.barrier()
    return rows


def _serve_rows(a) -> list[dict]:
    rows = []
    for n in [int(x) for x in a.serve_replicas.split(",") if x]:
        if n > torch.cuda.device_count():
            print(f"serve: {n} replicas need {n} GPUs, {torch.cuda.device_count()} here: skipped", flush=True)
            continue
        out = Path(tempfile.mkdtemp(prefix="fpserve")) / "load.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "load_serve.py"), "--start", "--replicas", str(n),
               "--ckpt", str(a.ckpt), "--requests", str(a.serve_requests), "--concurrency", str(2 * n * a.batch),
               "--max-batch-size", str(a.batch), "--frames", "16", "--size", str(a.size), "--steps", str(a.steps),
               "--label", f"{n} replicas", "--out", str(out)]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        print(r.stdout, flush=True)
        if r.returncode != 0:
            print(f"serve with {n} replicas failed:\n{r.stderr[-3000:]}", flush=True)
            continue
        result = json.loads(out.read_text())
        rows.append({"bench": "serve_throughput", "replicas": n, **result["summary"],
                     "gpu": torch.cuda.get_device_name(), "commit": result["machine"]["commit"]})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=2, help="Processes for the parallel runs (one per GPU).")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--long-frames", type=int, default=64, help="The clip the windows runs split.")
    ap.add_argument("--backend", default="eager", help="eager and/or triton, comma-separated.")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--serve-replicas", default="", help="e.g. 1,2,4: load_serve.py runs (needs --ckpt).")
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--batch", type=int, default=2, help="Serve: --max-batch-size.")
    ap.add_argument("--serve-requests", type=int, default=32)
    ap.add_argument("--out", default=None, help="Append JSON rows to this file.")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_parallel: needs CUDA GPUs")
    rows = []
    if not a.skip_latency:
        from engine.distributed import launch

        rows += launch(_latency_worker, a.gpus, (a,), device="cuda")
    if a.serve_replicas:
        if not a.ckpt:
            raise SystemExit("--serve-replicas needs --ckpt (the replicas load a checkpoint folder)")
        rows += _serve_rows(a)
    if a.out:
        write_rows(rows, a.out)


if __name__ == "__main__":
    main()

"""Shared timing helpers for the kernel benchmarks (DESIGN.md convention 2: rows, never asserts).

Every row records op, backend, shape, dtype, median/p20/p80 microseconds, achieved GB/s, the GB/s of a
device-to-device copy of the same bytes measured in the same run, GPU name, versions and commit.
"""
import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # the kernels' input dtypes


def _dtype_names(text):
    """--dtypes: comma-separated names of DTYPES, as a list."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in DTYPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected names from {', '.join(DTYPES)}, got {text!r}")
    return names


def kernel_bench_args(doc, sweep, big):
    """The options every kernel benchmark takes; ``sweep``: what --sweep times, ``big``: the largest shape."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", help="append JSON rows to this file")
    ap.add_argument("--dtypes", type=_dtype_names, default="fp32,fp16", help="comma-separated: fp32, fp16, bf16")
    ap.add_argument("--sweep", action="store_true", help=f"also time {sweep} at {big}")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    ap.add_argument("--profile-once", action="store_true",
                    help=f"only run the kernel twice per dtype at {big} (for ncu), no timing")
    return ap


def commit():
    """Short commit of the checkout (``-dirty`` with uncommitted changes); FPENGINE_COMMIT overrides."""
    if os.environ.get("FPENGINE_COMMIT"):
        return os.environ["FPENGINE_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return head + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def env_info():
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": commit(),
    }


def warm_up_gpu(seconds=1.0):
    """Run matrix products for a while so the first timed rows don't see idle clocks."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def bench_gpu(fn, warmup_ms=25, rep_ms=200):
    """Device time per call: triton.testing.do_bench (CUDA events, L2 flushed before every call).

    Returns (median, p20, p80) in microseconds. The flush gives the host a head start, so this is the
    GPU's time; launch overhead shows in ``bench_wall``.
    """
    import triton.testing

    q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return tuple(1000.0 * x for x in q)


def bench_graph(fn):
    """Device time per call replayed from a CUDA graph (no launch overhead, no L2 flush), in us; None if
    the callable cannot be captured."""
    import triton.testing

    try:
        return 1000.0 * triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not fail
        print(f"bench_graph: {type(exc).__name__}: {exc}", flush=True)
        return None


def _batch_s(fn, calls):
    """Wall seconds of ``calls`` back-to-back calls, synchronised at the end."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_wall(fn, calls=None, repeats=11):
    """Host wall time per call of back-to-back calls (launch overhead included), synchronised per batch.

    Returns (median, p20, p80) in microseconds over ``repeats`` batches of ``calls`` calls (by default
    as many as fill about 20 ms).
    """
    fn()
    torch.cuda.synchronize()
    if calls is None:
        calls = min(200, max(3, int(0.02 / max(_batch_s(fn, 1), 1e-6))))
    per_call = sorted(1e6 * _batch_s(fn, calls) / calls for _ in range(repeats))
    q = statistics.quantiles(per_call, n=5)  # 20/40/60/80 % cut points
    return statistics.median(per_call), q[0], q[3]


def wall_ratio(fn, baseline, calls=100, repeats=21):
    """How many times faster ``fn`` is than ``baseline`` in host wall time per call, measured in
    alternating batches (``calls`` back-to-back calls each, synchronised), so that a noisy host
    slows both alike. Returns (median, p20, p80) of the per-pair ratios baseline / fn."""
    _batch_s(fn, calls), _batch_s(baseline, calls)
    ratios = sorted(_batch_s(baseline, calls) / _batch_s(fn, calls) for _ in range(repeats))
    q = statistics.quantiles(ratios, n=5)
    return statistics.median(ratios), q[0], q[3]


def copy_gbps(nbytes):
    """GB/s of a device-to-device copy of ``nbytes`` bytes in all (half read, half written)."""
    n = max(int(nbytes) // 2, 16)
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    med, _, _ = bench_gpu(lambda: dst.copy_(src))
    return 2 * n / (med * 1e-6) / 1e9


def timed_first_call(fn):
    """Wall seconds of the first call (compilation included)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def write_rows(rows, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def report(rows, out, op):
    """Append the rows to ``out`` (if given) and print them as a markdown table."""
    if out:
        write_rows(rows, out)
    print()
    print(markdown_table(rows, op))


def markdown_table(rows, title):
    """One markdown table: backend rows with the ratio to eager and the fraction of copy bandwidth."""
    if not rows:
        return f"### {title}\n\n(no rows)\n"
    env = rows[0]
    lines = [
        f"### {title}",
        "",
        f"card: {env['gpu']} · torch {env['torch']} · triton {env['triton']} · CUDA {env['cuda']} · "
        f"commit {env['commit']}",
        "",
        "| shape | dtype | backend | median us (p20-p80) | graph us | wall us/call | GB/s | copy GB/s (same bytes) | "
        "% of copy | speed-up vs eager (device) | vs eager (graph) | vs eager (wall) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    eager = {(r["shape"], r["dtype"]): r for r in rows if r["backend"] == "eager"}
    for r in rows:
        e = eager.get((r["shape"], r["dtype"]))
        sp = f"{e['median_us'] / r['median_us']:.1f}x" if e else "-"
        spw = f"{e['wall_us'] / r['wall_us']:.1f}x" if e and r.get("wall_us") and e.get("wall_us") else "-"
        wall = f"{r['wall_us']:.1f}" if r.get("wall_us") else "-"
        graph = f"{r['graph_us']:.1f}" if r.get("graph_us") else "-"
        spg = f"{e['graph_us'] / r['graph_us']:.1f}x" if e and r.get("graph_us") and e.get("graph_us") else "-"
        extra = f" (compile {r['compile_s']:.0f} s)" if r.get("compile_s") else ""
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['backend']}{extra} | {r['median_us']:.1f} "
            f"({r['p20_us']:.1f}-{r['p80_us']:.1f}) | {graph} | {wall} | {r['gbps']:.0f} | {r['copy_gbps']:.0f} | "
            f"{100 * r['gbps'] / r['copy_gbps']:.0f}% | {sp} | {spg} | {spw} |"
        )
    return "\n".join(lines) + "\n"


def results_markdown(paths, header=""):
    """benchmarks/RESULTS.md body from JSON-row files: one table per op, in file order."""
    rows = []
    for p in paths:
        rows += [json.loads(line) for line in Path(p).read_text().splitlines() if line.strip()]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    return header + "\n".join(markdown_table([r for r in rows if r["op"] == op], op) for op in ops)


if __name__ == "__main__":  # python -m benchmarks.common rows.jsonl ... > benchmarks/RESULTS.md
    import sys

    print(results_markdown(sys.argv[1:]))

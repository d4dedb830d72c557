"""Load on `fpengine serve` from localhost: throughput and p50/p95 latency. Never asserts.

Bounded: at most --requests requests (<= 1000), --concurrency at once (<= 64), and no new request
after --time-limit seconds (<= 1800); each request has its own --timeout. Only loopback URLs.

    # start a service for the run (a local Ray instance, stopped at the end):
    python benchmarks/load_serve.py --start --replicas 2 --replica-cpus 1 --max-batch-size 4 \
        --requests 24 --concurrency 4 --frames 8 --size 64 --steps 2 --out load.json
    # or load a service that is already running:
    python benchmarks/load_serve.py --url http://127.0.0.1:8000 --requests 24 --concurrency 4

Each request posts --clip (default examples/walk.npz) with the options below; its latency runs
from sending to the last byte of the mp4, TTFB to the first byte. The JSON written to --out holds
every request and the summary; a Markdown row for benchmarks/RESULTS.md is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=None, help="A running service (loopback only).")
    p.add_argument("--start", action="store_true", help="Start `fpengine serve` for the run.")
    p.add_argument("--port", type=int, default=8765, help="With --start.")
    for name, kind, default in (("--replicas", int, 2), ("--replica-cpus", float, 1.0), ("--max-batch-size", int, 4),
                                ("--batch-wait-ms", float, 50.0), ("--max-queue", int, 64), ("--max-ongoing", int, 0),
                                ("--num-cpus", int, None), ("--object-store-mb", int, 200)):
        p.add_argument(name, type=kind, default=default, help="With --start: passed to `fpengine serve`.")
    p.add_argument("--ckpt", default=None, help="With --start: checkpoint folder (default: demo model).")
    p.add_argument("--engine", default=None, help="With --start: an engine directory instead (fpengine export).")
    p.add_argument("--backend", default=None, help="With --start and --engine: its backend (e.g. triton).")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2, help="Requests sent (one at a time) before timing.")
    p.add_argument("--time-limit", type=float, default=300.0, help="No new request after this many seconds.")
    p.add_argument("--timeout", type=float, default=300.0, help="Per request.")
    p.add_argument("--clip", type=Path, default=ROOT / "examples" / "walk.npz")
    p.add_argument("--prompt", default="a person walking in a park")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="Height and width.")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--label", default="", help="Names the run in the printed row.")
    p.add_argument("--out", type=Path, default=Path("load_serve.json"), help="JSON results.")
    a = p.parse_args(argv)
    if (a.url is None) == (not a.start):
        p.error("pass --url URL or --start")
    a.requests, a.concurrency = min(max(a.requests, 1), 1000), min(max(a.concurrency, 1), 64)
    a.time_limit, a.warmup = min(max(a.time_limit, 1.0), 1800.0), min(max(a.warmup, 0), 10)
    if a.url is not None and urlparse(a.url).hostname not in LOOPBACK:
        p.error(f"--url {a.url}: only a service on this machine (127.0.0.1, localhost, ::1) is loaded")
    return a


class Started:
    """`fpengine serve` in a subprocess, its own session; SIGTERM at the end."""

    def __init__(self, a):
        self.tmp = Path(tempfile.mkdtemp(prefix="fpload"))
        self.log_path = self.tmp / "serve.log"
        cmd = [sys.executable, "-m", "engine", "serve", "--port", str(a.port), "--workdir", str(self.tmp / "work"),
               "--replicas", str(a.replicas), "--replica-cpus", str(a.replica_cpus),
               "--max-batch-size", str(a.max_batch_size), "--batch-wait-ms", str(a.batch_wait_ms),
               "--max-queue", str(a.max_queue), "--max-ongoing", str(a.max_ongoing),
               "--object-store-mb", str(a.object_store_mb), "--max-frames", str(max(a.frames, 256))]
        if a.num_cpus:
            cmd += ["--num-cpus", str(a.num_cpus)]
        for flag, value in (("--ckpt", a.ckpt), ("--engine", a.engine), ("--backend", a.backend)):
            if value:
                cmd += [flag, value]
        # Token auth with a throwaway token (nothing written to ~/.ray); Ray's files in self.tmp.
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(self.tmp),
               "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{a.port}"
        t0 = time.time()
        while "serving " not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.time() - t0 > 600:
                self.stop()
                raise SystemExit(f"fpengine serve did not start:\n{self.log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        self.startup_s = time.time() - t0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def one_request(url: str, clip: bytes, options: dict, timeout: float) -> dict:
    import requests

    t0 = time.perf_counter()
    rec = {"status": None, "latency_s": None, "ttfb_s": None, "bytes": 0, "batch_size": None, "error": None}
    try:
        with requests.post(f"{url}/generate", files={"clip": ("clip.npz", clip)},
                           data={"options": json.dumps(options)}, timeout=timeout, stream=True) as r:
            rec["status"], rec["batch_size"] = r.status_code, r.headers.get("x-fpengine-batch-size")
            body = b""
            for chunk in r.iter_content(chunk_size=None):
                if rec["ttfb_s"] is None and chunk:
                    rec["ttfb_s"] = time.perf_counter() - t0
                rec["bytes"] += len(chunk)
                if r.status_code != 200 and len(body) < 300:
                    body += chunk
            if r.status_code != 200:
                rec["error"] = body[:300].decode("utf-8", "replace")
    except Exception as exc:  # a failed request is a result, not a crash
        rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
    rec["latency_s"] = time.perf_counter() - t0
    return rec


def run(a) -> dict:
    clip = a.clip.read_bytes()
    options = {"prompt": a.prompt, "num_frames": a.frames, "height": a.size, "width": a.size,
               "num_inference_steps": a.steps, "guidance_scale": a.guidance}
    service = Started(a) if a.start else None
    url = service.url if service else a.url.rstrip("/")
    try:
        warm = [one_request(url, clip, {**options, "seed": 10_000 + i}, a.timeout) for i in range(a.warmup)]
        records, lock, next_index = [], threading.Lock(), [0]
        t_start = time.perf_counter()

        def worker():
            while True:
                with lock:
                    i = next_index[0]
                    if i >= a.requests or time.perf_counter() - t_start > a.time_limit:
                        return
                    next_index[0] += 1
                rec = one_request(url, clip, {**options, "seed": i}, a.timeout)
                rec["t_end_s"] = time.perf_counter() - t_start
                with lock:
                    records.append(rec)

        threads = [threading.Thread(target=worker) for _ in range(a.concurrency)]
        load_before = os.getloadavg()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t_start
        load_after = os.getloadavg()
    finally:
        if service:
            service.stop()
    ok = [r for r in records if r["status"] == 200]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
    lat, ttfb = [r["latency_s"] for r in ok], [r["ttfb_s"] for r in ok if r["ttfb_s"] is not None]
    sizes = {}
    for r in ok:
        sizes[r["batch_size"]] = sizes.get(r["batch_size"], 0) + 1
    summary = {
        "label": a.label, "sent": len(records), "ok": len(ok),
        "rejected_503": sum(r["status"] == 503 for r in records),
        "failed": sum(r["status"] != 200 and r["status"] != 503 for r in records), "wall_s": wall,
        "throughput_rps": len(ok) / wall if wall else None,
        "frames_per_s": len(ok) * a.frames / wall if wall else None,
        "latency_p50_s": pct(lat, 50), "latency_p95_s": pct(lat, 95),
        "ttfb_p50_s": pct(ttfb, 50), "ttfb_p95_s": pct(ttfb, 95), "batch_sizes": sizes,
        "warmup_latency_s": [w["latency_s"] for w in warm], "startup_s": service.startup_s if service else None,
    }
    return {
        "summary": summary, "records": records,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": load_after, "versions": _versions(),
                    "commit": _commit()},
    }


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("ray", "torch", "diffusers", "fpengine"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _row(result: dict) -> str:
    s, a = result["summary"], result["settings"]
    f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    service = (f"{a['replicas']} x {a['replica_cpus']:g} CPU, batch {a['max_batch_size']}" if a["start"]
               else a["url"])
    request = f"{a['frames']}f {a['size']}x{a['size']} {a['steps']} steps cfg {a['guidance']:g}"
    answered = f"{s['ok']}/{s['sent']} ({s['rejected_503']} x 503)"
    cells = [s["label"] or "-", service, request, a["concurrency"], answered,
             f(s["throughput_rps"], 3), f(s["frames_per_s"]), f(s["latency_p50_s"]), f(s["latency_p95_s"]),
             f(s["ttfb_p50_s"]), s["batch_sizes"]]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main(argv=None):
    a = _args(argv)
    result = run(a)
    a.out.write_text(json.dumps(result, indent=1))
    print("| run | service | request | concurrency | ok/sent | req/s | frames/s | p50 s | p95 s | TTFB p50 s "
          "| batch sizes |")
    print("|---" * 11 + "|")
    print(_row(result))
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

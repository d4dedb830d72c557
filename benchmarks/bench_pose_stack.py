"""The demo's pose stack on the CPU (issue 22: at most 20 ms for a 16-frame clip on 2 cores):
lift (in windows of the trained length), PhysNet, fuse and fit the camera, exactly as
``fpengine generate`` runs it (``finephys.sampler.poses.pose_stack``), on a real CMU walk seen
by a 1920x1080 camera.

    python benchmarks/bench_pose_stack.py [--threads 2] [--frames 16 64] [--out rows.jsonl]

Rows: median and p20/p80 of the wall time per call over ``--repeats`` timed calls after a
warm-up, for eager PyTorch and ``torch.compile`` (Inductor, CPU) of the same function.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import commit, write_rows  # noqa: E402
from finephys.model.demo import load_demo_pose_parts  # noqa: E402
from finephys.sampler.poses import pose_stack  # noqa: E402
from finephys.training.pose_data import find_motion, framed_cameras, project, sample_at  # noqa: E402

MOTION = ROOT.parent / "shared" / "data" / "motion" / "cmu" / "07_01.bvh"


def clip(frames: int, fps: float):
    (walk,) = find_motion([Path(os.environ.get("FPENGINE_MOTION_DIR", MOTION.parents[1])) / "cmu" / MOTION.name])
    world = sample_at(walk, (np.arange(frames) / fps) % walk.duration)[None]
    wh = np.array([[1920.0, 1080.0]])
    cams = framed_cameras(world, np.array([0.5]), np.array([0.17]), np.zeros(1), wh, np.array([1920.0]),
                          np.array([500.0]), wh / 2)
    kp = torch.as_tensor(project(world, cams)[0], dtype=torch.float32)
    return kp, torch.ones(kp.shape[:-1])


def timed(fn, repeats: int) -> tuple[float, float, float]:
    for _ in range(5):
        fn()
    ms = sorted(1000 * _once(fn) for _ in range(repeats))
    q = statistics.quantiles(ms, n=5)
    return statistics.median(ms), q[0], q[3]


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--frames", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg, lifter, physnet = load_demo_pose_parts()
    parts = SimpleNamespace(lifter=lifter, physnet=physnet)
    params = sum(p.numel() for m in (lifter, physnet) for p in m.parameters())
    eager = torch.no_grad()(lambda kp, sc: pose_stack(parts, kp, sc, cfg.fps, cfg.pose.fuse_weight))
    compiled = torch.compile(eager)
    rows = []
    for frames in a.frames:
        kp, sc = clip(frames, cfg.fps)
        for name, fn in (("eager", eager), ("torch.compile", compiled)):
            try:
                med, lo, hi = timed(lambda: fn(kp, sc), a.repeats)
            except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
                print(f"{name} at {frames} frames failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            rows.append({"bench": "pose_stack", "backend": name, "frames": frames, "threads": a.threads,
                         "median_ms": round(med, 2), "p20_ms": round(lo, 2), "p80_ms": round(hi, 2),
                         "params": params, "cpu": os.cpu_count(), "torch": torch.__version__, "commit": commit()})
            print(rows[-1], flush=True)
    if a.out:
        write_rows(rows, a.out)


if __name__ == "__main__":
    main()

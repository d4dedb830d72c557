"""The judge's own accuracy on held-out renders (issue 18 asks for PCK@0.1 >= 0.95), with its
standard error over windows and split by background:

    python benchmarks/judge_quality.py [--clips 400] [--seed 2] [--judge J.onnx] [--motion DIR]

Windows of the last 20% of every shared CMU sequence and of CMU Panoptic (never trained on), drawn
as ``train-judge`` scores its judge (16 frames at 128x128, 8 fps, random cameras and looks); seed 0
gives the windows ``benchmarks/video_quality.py`` draws for its ``judge`` row.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

if __package__ in (None, ""):  # python benchmarks/judge_quality.py
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.video_quality import MOTION  # noqa: E402
from engine.cli.train import judge_report  # noqa: E402
from finephys.training.judge import JUDGE_ONNX, SIZE  # noqa: E402
from finephys.training.train_data import RenderSource  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=400)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--judge", type=Path, default=JUDGE_ONNX)
    ap.add_argument("--motion", type=Path, default=MOTION)
    a = ap.parse_args()
    if a.clips < 2:
        ap.error(f"--clips {a.clips}: expected at least 2 (a standard error needs two windows)")
    if not a.judge.is_file():
        ap.error(f"--judge {a.judge}: file not found, expected a judge .onnx (train-judge writes one)")
    if not (a.motion / "cmu").is_dir():
        ap.error(f"--motion {a.motion}: no cmu/ folder there, expected the shared motion capture (../shared/data/motion)")
    source = RenderSource([a.motion / "cmu", a.motion / "131_01.bvh"], (SIZE, SIZE), 8.0, 16,
                          held_out=[a.motion / "panoptic_160906_band2"])
    t0 = time.perf_counter()
    print(judge_report(a.judge, source, a.clips, a.seed))
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()

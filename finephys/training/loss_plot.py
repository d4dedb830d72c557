"""The training loss curve as a PNG, drawn with Pillow (no plotting library needed).

Log-scale y axis (mm): training MPJPE of S_dd, PhysNet's prediction error, held-out MPJPE of
S_dd and S_fused, against the training step.
"""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from finephys.files import atomic_path

SERIES = (("lifter", "lifter_step", "train S_dd MPJPE", (40, 110, 220)),
          ("physnet", "physnet_step", "train PhysNet error", (230, 120, 30)),
          ("val_dd", "val_step", "held-out S_dd MPJPE", (40, 170, 80)),
          ("val_fused", "val_step", "held-out S_fused MPJPE", (200, 40, 60)))


def plot_history(hist, path, size=(720, 440), series=SERIES,
                 title: str = "fpengine train-pose: error (mm, log scale) vs step") -> Path:
    """A log-scale line per (values, steps, label, colour) attribute tuple of ``series`` of ``hist``."""
    path = Path(path)
    w, h = size
    left, right, top, bottom = 64, 16, 28, 44
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    lines = [(getattr(hist, k), getattr(hist, s), label, color) for k, s, label, color in series
             if getattr(hist, k)]
    values = [v for ys, _, _, _ in lines for v in ys if v > 0]
    steps = [x for _, xs, _, _ in lines for x in xs]
    if values and steps:
        lo, hi = math.log10(min(values)) - 0.05, math.log10(max(values)) + 0.05
        x_max = max(steps)

        def xy(x, y):
            px = left + (w - left - right) * x / max(x_max, 1)
            py = top + (h - top - bottom) * (hi - math.log10(max(y, 1e-9))) / max(hi - lo, 1e-9)
            return px, py

        for e in range(math.floor(lo), math.ceil(hi) + 1):
            for m in (1, 2, 5):
                v = m * 10.0**e
                if lo <= math.log10(v) <= hi:
                    _, py = xy(0, v)
                    d.line([(left, py), (w - right, py)], fill=(225, 225, 225))
                    d.text((4, py - 6), f"{v:g}", fill=(80, 80, 80))
        for k in range(5):
            x = x_max * k / 4
            px, _ = xy(x, 10.0**hi)
            d.text((px - 10, h - bottom + 6), f"{x:.0f}", fill=(80, 80, 80))
        for ys, xs, label, color in lines:
            pts = [xy(x, y) for x, y in zip(xs, ys)]
            if len(pts) > 1:
                d.line(pts, fill=color, width=2)
            for px, py in pts[-1:]:
                d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        for i, (_, _, label, color) in enumerate(lines):
            y = top + 6 + 14 * i
            d.line([(w - right - 190, y + 6), (w - right - 170, y + 6)], fill=color, width=3)
            d.text((w - right - 164, y), label, fill=(30, 30, 30))
    d.rectangle([left, top, w - right, h - bottom], outline=(60, 60, 60))
    d.text((left, 8), title, fill=(30, 30, 30))
    d.text((w // 2 - 14, h - 18), "step", fill=(30, 30, 30))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path

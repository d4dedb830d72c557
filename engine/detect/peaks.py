"""Sub-pixel joint positions from a pose model's heatmaps.

A top-down model's heatmap is a few times coarser than its input (a 32x32 map for a 128x128 crop),
so the arg-max alone moves a joint in steps of 4 input pixels, and the quarter-pixel shift toward
the higher neighbour (SimpleBaseline, HRNet) in steps of one. Where the map around its peak is
Gaussian, as models trained on Gaussian targets draw it, its logarithm is a quadratic whose top is
one Newton step from the arg-max: offset = -H^-1 g, with the gradient g and the Hessian H of the
log-map taken by central differences there (the distribution-aware decoding of Zhang et al.,
CVPR 2020, "DARK"). The map is smoothed first with a small Gaussian, which keeps a Gaussian peak
Gaussian and evens out a noisy one; near the border, where the smoothing would pad the map, the
step is taken on the map as it is. Where the log-map is not concave at the arg-max (a flat top,
a map that is zero or negative nearby, the border itself, a map under 3 pixels wide), or the step
would leave the peak's pixel by more than one, the quarter shift is used instead.
"""
from __future__ import annotations

import numpy as np

BLUR_SIGMA = 1.5  # heatmap pixels (chosen on a validation draw of renders: benchmarks/RESULTS.md)
_FLOOR = 1e-10


def _blur(hm: np.ndarray, sigma: float) -> np.ndarray:
    """(K, h, w) smoothed along both axes by a Gaussian of ``sigma`` pixels (edges replicated)."""
    r = max(1, int(np.ceil(2 * sigma)))
    taps = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
    taps /= taps.sum()
    h, w = hm.shape[1:]
    p = np.pad(hm, ((0, 0), (r, r), (r, r)), mode="edge")
    rows = sum(t * p[:, r:r + h, i:i + w] for i, t in enumerate(taps))
    p = np.pad(rows, ((0, 0), (r, r), (0, 0)), mode="edge")
    return sum(t * p[:, i:i + h, :] for i, t in enumerate(taps))


def _quarter(hm, ix, iy):
    k, h, w = hm.shape
    j = np.arange(k)
    lo_x, hi_x = np.maximum(ix - 1, 0), np.minimum(ix + 1, w - 1)
    lo_y, hi_y = np.maximum(iy - 1, 0), np.minimum(iy + 1, h - 1)
    dx = np.where((ix > 0) & (ix < w - 1), np.sign(hm[j, iy, hi_x] - hm[j, iy, lo_x]), 0.0)
    dy = np.where((iy > 0) & (iy < h - 1), np.sign(hm[j, hi_y, ix] - hm[j, lo_y, ix]), 0.0)
    return 0.25 * dx, 0.25 * dy


def _newton(log: np.ndarray, positive: np.ndarray, ix, iy):
    """(ok, x offset, y offset) of one Newton step on ``log`` at the interior pixels (ix, iy)."""
    k, h, w = log.shape
    j = np.arange(k)
    cx, cy = np.clip(ix, 1, w - 2), np.clip(iy, 1, h - 2)

    def at(dy, dx):
        return log[j, cy + dy, cx + dx]

    gx, gy = 0.5 * (at(0, 1) - at(0, -1)), 0.5 * (at(1, 0) - at(-1, 0))
    hxx = at(0, 1) - 2 * at(0, 0) + at(0, -1)
    hyy = at(1, 0) - 2 * at(0, 0) + at(-1, 0)
    hxy = 0.25 * (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1))
    det = hxx * hyy - hxy ** 2
    near = np.all([positive[j, cy + a, cx + b] for a in (-1, 0, 1) for b in (-1, 0, 1)], axis=0)
    ok = near & (hxx < 0) & (det > 0)
    safe = np.where(ok, det, 1.0)
    ox = -(hyy * gx - hxy * gy) / safe
    oy = -(hxx * gy - hxy * gx) / safe
    return ok & (np.abs(ox) <= 1) & (np.abs(oy) <= 1), ox, oy


def heatmap_peaks(hm: np.ndarray, blur_sigma: float = BLUR_SIGMA):
    """(x, y, score) of each of the (K, h, w) maps' peaks: x and y in heatmap pixels (pixel
    centres at integers, sub-pixel), score the map's maximum. Near the border, where the smoothing
    would pad the map, the step is taken on the map as it is."""
    hm = np.asarray(hm, np.float64)
    k, h, w = hm.shape
    flat = hm.reshape(k, -1)
    iy, ix = np.divmod(flat.argmax(axis=1), w)
    score = flat.max(axis=1)
    qx, qy = _quarter(hm, ix, iy)
    x, y = ix + qx, iy + qy
    if h < 3 or w < 3:
        return x, y, score
    inner = (ix > 0) & (ix < w - 1) & (iy > 0) & (iy < h - 1)
    raw_ok, rx, ry = _newton(np.log(np.maximum(hm, _FLOOR)), hm > _FLOOR, ix, iy)
    ok, ox, oy = inner & raw_ok, rx, ry
    r = max(1, int(np.ceil(2 * blur_sigma)))
    if blur_sigma > 0 and h > 2 * r and w > 2 * r:
        smooth = _blur(hm, blur_sigma)
        b_ok, bx, by = _newton(np.log(np.maximum(smooth, _FLOOR)), smooth > _FLOOR, ix, iy)
        away = (ix >= r) & (ix < w - r) & (iy >= r) & (iy < h - r)  # the smoothing saw no padding
        ok = np.where(away, b_ok, ok)
        ox, oy = np.where(away, bx, ox), np.where(away, by, oy)
    return np.where(ok, ix + ox, x), np.where(ok, iy + oy, y), score

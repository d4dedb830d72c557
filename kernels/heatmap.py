"""Gaussian joint heatmaps (DESIGN.md step 6).

H_j(x, y) = v_j * exp(-((x - u_j)^2 + (y - w_j)^2) / (2 sigma^2)), pixel centres at integer
coordinates; keypoints (B,T,J,2) in pixels (x, y), visibility (B,T,J) -> (B,T,J,H,W).
"""
import math

import torch


def _check_heatmap_args(keypoints, visibility, height, width, sigma):
    if keypoints.dim() != 4 or keypoints.shape[-1] != 2:
        raise ValueError(f"keypoints: expected shape (B,T,J,2), got {tuple(keypoints.shape)}")
    if visibility.shape != keypoints.shape[:-1]:
        raise ValueError(
            f"visibility: expected shape {tuple(keypoints.shape[:-1])} to match keypoints, got {tuple(visibility.shape)}"
        )
    if int(height) <= 0 or int(width) <= 0:
        raise ValueError(f"height/width: expected positive sizes, got {height}x{width}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma: expected a finite number > 0, got {sigma!r}")


def render_heatmaps_ref(keypoints, visibility, height, width, sigma, out_dtype=torch.float32):
    """Plain-torch reference: fp32 math, output cast to ``out_dtype``."""
    _check_heatmap_args(keypoints, visibility, height, width, sigma)
    kp = keypoints.float()
    xs = torch.arange(width, device=kp.device, dtype=torch.float32)
    ys = torch.arange(height, device=kp.device, dtype=torch.float32)
    inv = 1.0 / (2.0 * float(sigma) ** 2)
    gx = torch.exp(-((xs - kp[..., 0:1]) ** 2) * inv)  # (B,T,J,W)
    gy = torch.exp(-((ys - kp[..., 1:2]) ** 2) * inv)  # (B,T,J,H)
    maps = visibility.float()[..., None, None] * gy[..., :, None] * gx[..., None, :]
    return maps.to(out_dtype)


def render_heatmaps(keypoints, visibility, height, width, sigma, out_dtype=torch.float32):
    """Dispatching entry point (the Triton kernel on CUDA once it exists; the ref elsewhere)."""
    return render_heatmaps_ref(keypoints, visibility, height, width, sigma, out_dtype)

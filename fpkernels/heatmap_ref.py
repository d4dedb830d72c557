"""Gaussian joint heatmaps in plain torch: the argument checks and ``render_heatmaps_ref``, the ground
truth of the kernel in ``fpkernels.heatmap`` (see its docstring). Imports no triton: the reference
path (the CPU, the packaged backends) loads without it."""
import math
import numbers

import torch

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_size(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def _check_heatmap_args(keypoints, visibility, height, width, sigma):
    if not isinstance(keypoints, torch.Tensor):
        raise ValueError(f"keypoints: expected a torch.Tensor, got {type(keypoints).__name__}")
    if keypoints.dim() != 4 or keypoints.shape[-1] != 2:
        raise ValueError(f"keypoints: expected shape (B,T,J,2), got {tuple(keypoints.shape)}")
    if not isinstance(visibility, torch.Tensor):
        raise ValueError(f"visibility: expected a torch.Tensor, got {type(visibility).__name__}")
    if visibility.shape != keypoints.shape[:-1]:
        raise ValueError(
            f"visibility: expected shape {tuple(keypoints.shape[:-1])} to match keypoints, "
            f"got {tuple(visibility.shape)}"
        )
    if visibility.device != keypoints.device:
        raise ValueError(f"visibility: expected device {keypoints.device} (that of keypoints), got {visibility.device}")
    _check_size("height", height)
    _check_size("width", width)
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma <= 0:
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

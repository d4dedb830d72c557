"""Gaussian joint heatmaps (DESIGN.md step 6).

H_j(x, y) = v_j * exp(-((x - u_j)^2 + (y - w_j)^2) / (2 sigma^2)), pixel centres at integer
coordinates; keypoints (B,T,J,2) in pixels (x, y), visibility (B,T,J) -> (B,T,J,H,W).

``render_heatmaps`` dispatches: the Triton kernel on CUDA tensors, the reference elsewhere
(``use_kernel`` forces either; the kernel also runs on CPU tensors under TRITON_INTERPRET=1).
``unshuffle=r`` writes straight into the heatmap encoder's ``PixelUnshuffle(r)`` layout,
(B,T,J*r*r,H/r,W/r) with channel ``j*r*r + dy*r + dx`` holding pixel ``(y*r + dy, x*r + dx)``: the
same numbers as ``pixel_unshuffle(render_heatmaps(...))`` without the extra pass over memory.
"""
import math
import numbers

import torch

from fpkernels.launch import Launcher, cdiv as _cdiv, next_pow2 as _next_pow2

try:  # fpkernels/ imports only torch and triton; triton is optional off Linux
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

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


if triton is not None:

    @triton.jit
    def _render_heatmaps_gauss_kernel(
        out_ptr,  # (B*T*J*R*R, HO, WO) contiguous; plane m = n*R*R + dy*R + dx
        kp_ptr, vis_ptr,  # (B*T*J, 2) x,y pixels and (B*T*J,), contiguous
        HO, WO, tiles_w, tiles_per_plane, inv,  # output plane size, tiles, 1 / (2 sigma^2)
        R: tl.constexpr,  # pixel-unshuffle factor (1 = plain (H, W) maps)
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    ):
        pid = tl.program_id(0)
        m = pid // tiles_per_plane
        tile = pid % tiles_per_plane
        n = m // (R * R)  # joint map (b, t, j)
        dy = (m // R) % R
        dx = m % R
        u = tl.load(kp_ptr + 2 * n).to(tl.float32)
        v = tl.load(kp_ptr + 2 * n + 1).to(tl.float32)
        vis = tl.load(vis_ptr + n).to(tl.float32)
        yo = (tile // tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)
        xo = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
        # pixel centres: x = xo*R + dx, y = yo*R + dy
        ex = (xo * R + dx).to(tl.float32) - u
        ey = (yo * R + dy).to(tl.float32) - v
        # H(x, y) = vis * exp(-(y - v)^2 / 2s^2) * exp(-(x - u)^2 / 2s^2), in the reference's order
        gx = tl.exp(-(ex * ex) * inv)
        gy = vis * tl.exp(-(ey * ey) * inv)
        val = gy[:, None] * gx[None, :]
        offs = m.to(tl.int64) * HO * WO + yo[:, None] * WO + xo[None, :]
        tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=(yo[:, None] < HO) & (xo[None, :] < WO))


_launch_heatmaps = Launcher(_render_heatmaps_gauss_kernel) if triton is not None else None


def _render_heatmaps_triton(keypoints, visibility, height, width, sigma, out_dtype, unshuffle,
                            block_h=None, block_w=None, num_warps=4):
    B, T, J, _ = keypoints.shape
    R = unshuffle
    HO, WO = height // R, width // R
    out = torch.empty((B, T, J * R * R, HO, WO), device=keypoints.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    kp = keypoints.contiguous()
    vis = visibility if visibility.is_floating_point() else visibility.float()
    vis = vis.contiguous()
    bw = block_w or min(_next_pow2(WO), 256)
    bh = block_h or max(1, min(_next_pow2(HO), 4096 // bw))
    tiles_w = _cdiv(WO, bw)
    tiles = tiles_w * _cdiv(HO, bh)
    inv = 1.0 / (2.0 * float(sigma) ** 2)
    _launch_heatmaps((B * T * J * R * R * tiles,), (out, kp, vis, HO, WO, tiles_w, tiles, inv),
                     {"R": R, "BLOCK_H": bh, "BLOCK_W": bw}, num_warps=num_warps)
    return out


def render_heatmaps(keypoints, visibility, height, width, sigma, out_dtype=torch.float32, *,
                    unshuffle=1, use_kernel=None):
    """Heatmaps (B,T,J,H,W), or (B,T,J*r*r,H/r,W/r) with ``unshuffle=r`` (PixelUnshuffle(r) layout).

    ``out_dtype``: float32, float16 or bfloat16 (the math is fp32 either way). ``use_kernel``: None =
    the Triton kernel on CUDA tensors and the reference elsewhere; True = the kernel (CUDA, or CPU
    under TRITON_INTERPRET=1); False = the reference.
    """
    _check_heatmap_args(keypoints, visibility, height, width, sigma)
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype: expected torch.float32, torch.float16 or torch.bfloat16, got {out_dtype!r}")
    _check_size("unshuffle", unshuffle)
    if height % unshuffle or width % unshuffle:
        raise ValueError(f"unshuffle: {unshuffle} must divide height and width, got {height}x{width}")
    if use_kernel is None:
        use_kernel = keypoints.is_cuda and triton is not None
    if use_kernel:
        return _render_heatmaps_triton(keypoints, visibility, height, width, sigma, out_dtype, unshuffle)
    maps = render_heatmaps_ref(keypoints, visibility, height, width, sigma, out_dtype)
    if unshuffle == 1:
        return maps
    B, T, J = keypoints.shape[:3]
    maps = torch.nn.functional.pixel_unshuffle(maps.reshape(B * T, J, height, width), unshuffle)
    return maps.reshape(B, T, J * unshuffle * unshuffle, height // unshuffle, width // unshuffle)

"""A user-supplied top-down 2D pose model in ONNX (for example RTMPose), run with onnxruntime.

Accepted models (checked when loading; anything else is an error naming what was found):
- one float32 input ``(N or 1, 3, H, W)`` with fixed H and W: an RGB crop of one person;
- outputs, either
  * SimCC (RTMPose): two outputs ``(N, K, W*r)`` and ``(N, K, H*r)`` with the same split ratio r
    (x first, or named with ``x`` / ``y``); a joint is at the arg-max bin / r, its score the
    smaller of the two maxima, or
  * heatmaps (SimpleBaseline, HRNet, ViTPose...): one output ``(N, K, h, w)``; the peak to a
    fraction of a pixel (``engine.detect.peaks``: a Newton step on the log of the smoothed map,
    else a quarter-pixel shift toward the higher neighbour), score = the maximum;
- K = 17 (COCO-17 order), 26 (Halpe-26) or 133 (COCO-WholeBody): the first 17 are COCO-17.
Scores are clipped to [0, 1]. The crop is the tracked region made to the input's aspect ratio
(padding with black outside the frame), normalised as ``norm`` says: ``imagenet`` (RGB, mean
123.675/116.28/103.53, std 58.395/57.12/57.375, MMPose's default), ``imagenet-bgr`` (the same on
BGR), ``unit`` (RGB / 255) or ``none`` (RGB 0-255).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from finephys.errors import InputError

from engine.detect.backend import EXTRA_HINT, PoseOutput
from engine.detect.peaks import heatmap_peaks
from engine.detect.track import Box, box_from_keypoints

KNOWN_K = {17: "COCO-17", 26: "Halpe-26", 133: "COCO-WholeBody"}
NORMS = ("imagenet", "imagenet-bgr", "unit", "none")
_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
_STD = np.array([58.395, 57.12, 57.375], np.float32)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _dim(d):
    return d if isinstance(d, int) and d > 0 else None


class OnnxPose:
    """Top-down pose model: ``estimate(frame, box)`` runs it on the crop of ``box``."""

    name = "onnx"

    def __init__(self, path, norm: str = "imagenet", min_score: float = 0.3):
        try:
            import onnxruntime as ort
        except ImportError:
            raise InputError(f"--pose-model needs onnxruntime; {EXTRA_HINT}") from None
        self.path = Path(path)
        where = f"--pose-model {self.path}"
        if not self.path.is_file():
            raise InputError(f"{where}: file not found, expected an ONNX pose model (.onnx)")
        if norm not in NORMS:
            raise InputError(f"--pose-model-norm {norm!r}: expected one of {', '.join(NORMS)}")
        self.norm, self.min_score = norm, float(min_score)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise InputError(f"{where}: cannot be loaded by onnxruntime ({_short(exc)}), "
                             f"expected an ONNX pose model") from None
        self.version = ort.__version__
        self._check_input(where)
        self._check_outputs(where)

    def _check_input(self, where):
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise InputError(f"{where}: has {len(inputs)} inputs "
                             f"({', '.join(i.name for i in inputs)}), expected one image input "
                             f"(1, 3, H, W)")
        inp = inputs[0]
        shape = list(inp.shape)
        if inp.type != "tensor(float)":
            raise InputError(f"{where}: input '{inp.name}' is {inp.type}, expected tensor(float) "
                             f"of shape (1, 3, H, W)")
        if len(shape) != 4 or _dim(shape[1]) != 3 or (_dim(shape[0]) not in (None, 1)):
            raise InputError(f"{where}: input '{inp.name}' has shape {shape}, expected "
                             f"(1, 3, H, W) (an RGB crop, channels first)")
        if _dim(shape[2]) is None or _dim(shape[3]) is None:
            raise InputError(f"{where}: input '{inp.name}' has shape {shape} with a dynamic "
                             f"height or width, expected a fixed size such as (1, 3, 256, 192)")
        self.input_name = inp.name
        self.height, self.width = int(shape[2]), int(shape[3])

    def _check_outputs(self, where):
        outs = self.session.get_outputs()
        found = ", ".join(f"'{o.name}' {list(o.shape)}" for o in outs)
        want = ("expected SimCC outputs (1, K, W*r) and (1, K, H*r), or one heatmap output "
                "(1, K, h, w), with K in 17, 26, 133")
        ranks = [len(o.shape) for o in outs]
        if len(outs) == 1 and ranks == [4]:
            self.kind, self.output_names = "heatmap", [outs[0].name]
        elif len(outs) == 2 and ranks == [3, 3]:
            a, b = outs
            if "y" in a.name.lower() and "x" in b.name.lower() and "x" not in a.name.lower():
                a, b = b, a
            self.kind, self.output_names = "simcc", [a.name, b.name]
            lx, ly = _dim(a.shape[2]), _dim(b.shape[2])
            if lx is not None and ly is not None and \
                    abs(lx / self.width - ly / self.height) > 1e-6:
                raise InputError(f"{where}: SimCC outputs {found} have split ratios "
                                 f"{lx / self.width:g} (x) and {ly / self.height:g} (y) for input "
                                 f"{self.height}x{self.width}, expected the same ratio")
        else:
            raise InputError(f"{where}: has outputs {found}, {want}")
        for o in outs:
            k = _dim(o.shape[1])
            if k is not None and k not in KNOWN_K:
                raise InputError(f"{where}: output '{o.name}' has {k} keypoints, {want}")

    # ---- pre/post-processing -------------------------------------------------------------
    def crop_geometry(self, box: Box):
        """(x0, y0, cw, ch): the crop's top-left corner (pixel-edge coordinates) and size."""
        side = 2.0 * box.half
        aspect = self.width / self.height
        # the smallest crop of the input's aspect ratio that holds the whole square region
        cw, ch = (side * aspect, side) if aspect >= 1 else (side, side / aspect)
        return box.cx + 0.5 - cw / 2, box.cy + 0.5 - ch / 2, cw, ch

    def _crop(self, frame: np.ndarray, geom) -> np.ndarray:
        from PIL import Image

        x0, y0, cw, ch = geom
        sx, sy = cw / self.width, ch / self.height
        img = Image.fromarray(frame).transform(
            (self.width, self.height), Image.Transform.AFFINE, (sx, 0.0, x0, 0.0, sy, y0),
            resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
        x = np.asarray(img, np.float32)
        if self.norm == "imagenet":
            x = (x - _MEAN) / _STD
        elif self.norm == "imagenet-bgr":
            x = (x[..., ::-1] - _MEAN) / _STD
        elif self.norm == "unit":
            x = x / 255.0
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None], np.float32)

    def _decode(self, outputs, where="--pose-model") -> tuple[np.ndarray, np.ndarray]:
        """Keypoints in input-pixel coordinates (pixel centres at integers) and scores."""
        if self.kind == "simcc":
            sx, sy = (np.asarray(o, np.float32) for o in outputs)
            if sx.ndim != 3 or sy.ndim != 3 or sx.shape[:2] != sy.shape[:2]:
                raise InputError(f"{where}: SimCC outputs have shapes {sx.shape} and {sy.shape}, "
                                 f"expected (1, K, W*r) and (1, K, H*r)")
            rx, ry = sx.shape[2] / self.width, sy.shape[2] / self.height
            if abs(rx - ry) > 1e-6:
                raise InputError(f"{where}: SimCC outputs have split ratios {rx:g} and {ry:g}, "
                                 f"expected the same ratio for x and y")
            sx, sy = sx[0], sy[0]
            x = sx.argmax(axis=1) / rx
            y = sy.argmax(axis=1) / ry
            score = np.minimum(sx.max(axis=1), sy.max(axis=1))
        else:
            hm = np.asarray(outputs[0], np.float32)
            if hm.ndim != 4:
                raise InputError(f"{where}: heatmap output has shape {hm.shape}, expected (1, K, h, w)")
            hm = hm[0]
            _, h, w = hm.shape
            px, py, score = heatmap_peaks(hm)
            # heatmap pixel centre j sits at input pixel (j + 0.5) * stride - 0.5
            x = (px + 0.5) * (self.width / w) - 0.5
            y = (py + 0.5) * (self.height / h) - 0.5
        k = x.shape[0]
        if k not in KNOWN_K:
            raise InputError(f"{where}: outputs {k} keypoints, expected 17 (COCO-17), 26 "
                             f"(Halpe-26) or 133 (COCO-WholeBody)")
        kp = np.stack([x, y], axis=1)[:17]
        sc = np.nan_to_num(np.asarray(score, np.float64)[:17], nan=0.0)
        return kp, np.clip(sc, 0.0, 1.0)

    def estimate(self, frame: np.ndarray, box: Box) -> PoseOutput | None:
        geom = self.crop_geometry(box)
        x0, y0, cw, ch = geom
        try:
            outputs = self.session.run(self.output_names, {self.input_name: self._crop(frame, geom)})
        except Exception as exc:
            raise InputError(f"--pose-model {self.path}: failed on a frame ({_short(exc)})") from None
        kp, sc = self._decode(outputs, f"--pose-model {self.path}")
        # input pixel centre u sits at x0 + (u + 0.5) * cw / W in pixel-edge coordinates
        kp = np.stack([x0 + (kp[:, 0] + 0.5) * cw / self.width - 0.5,
                       y0 + (kp[:, 1] + 0.5) * ch / self.height - 0.5], axis=1)
        height, width = frame.shape[:2]
        inside = (kp[:, 0] >= -0.5) & (kp[:, 0] <= width - 0.5) & (kp[:, 1] >= -0.5) & (kp[:, 1] <= height - 0.5)
        sc = np.where(inside, sc, 0.0)
        if not (sc >= self.min_score).any():
            return None
        predicted = box_from_keypoints(kp, sc, self.min_score, padding=1.4)
        return PoseOutput(kp.astype(np.float32), sc.astype(np.float32), predicted)

    def close(self) -> None:
        self.session = None

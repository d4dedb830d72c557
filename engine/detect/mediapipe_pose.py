"""MediaPipe BlazePose (the models inside the ``mediapipe`` 0.10.14 wheel), run on the CPU.

Two small MediaPipe graphs built from the calculators the wheel registers:
- the person detector (``pose_detection.tflite``, 224x224, the same decoding as MediaPipe's
  ``PoseDetectionCpu`` but keeping every person, not only the first);
- the landmark model (``pose_landmark_full.tflite`` through ``PoseLandmarkByRoiCpu``) run on the
  region chosen by the tracker; it returns 33 landmarks with visibilities and two auxiliary points
  from which the region of the next frame is predicted.
Outputs are parsed from their serialized protos, so any protobuf runtime works.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np

from finephys.errors import InputError

from engine.detect.backend import EXTRA_HINT, PoseOutput, quiet_native_stderr as _captured_stderr
from engine.detect.track import Box, Candidate, box_from_points

# BlazePose landmark index of each COCO-17 joint (nose, eyes, ears, shoulders, elbows, wrists,
# hips, knees, ankles); MediaPipe's "left" is the subject's left, as COCO's.
BLAZEPOSE_TO_COCO17 = (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)
ROI_SCALE = 1.25  # region = 2 x |centre - scale point| x 1.25, as MediaPipe's pose graphs
# The full-body landmark model moves by several of its input pixels when its region changes by a
# few percent (marked on half-body shots, where the region is extrapolated from hips out of
# view); averaging over three region sizes about halves that jitter, for three model runs.
REGION_SCALES = (1.0, 0.94, 1.06)

_DETECTOR_GRAPH = """
input_stream: "image"
output_stream: "detections"
node { calculator: "ImageToTensorCalculator" input_stream: "IMAGE:image"
  output_stream: "TENSORS:input_tensors" output_stream: "LETTERBOX_PADDING:letterbox_padding"
  options: { [mediapipe.ImageToTensorCalculatorOptions.ext] { output_tensor_width: 224
    output_tensor_height: 224 keep_aspect_ratio: true output_tensor_float_range { min: -1.0 max: 1.0 }
    border_mode: BORDER_ZERO } } }
node { calculator: "InferenceCalculator" input_stream: "TENSORS:input_tensors"
  output_stream: "TENSORS:detection_tensors"
  options: { [mediapipe.InferenceCalculatorOptions.ext] {
    model_path: "mediapipe/modules/pose_detection/pose_detection.tflite" delegate { xnnpack {} } } } }
node { calculator: "SsdAnchorsCalculator" output_side_packet: "anchors"
  options: { [mediapipe.SsdAnchorsCalculatorOptions.ext] { num_layers: 5 min_scale: 0.1484375
    max_scale: 0.75 input_size_height: 224 input_size_width: 224 anchor_offset_x: 0.5
    anchor_offset_y: 0.5 strides: 8 strides: 16 strides: 32 strides: 32 strides: 32
    aspect_ratios: 1.0 fixed_anchor_size: true } } }
node { calculator: "TensorsToDetectionsCalculator" input_stream: "TENSORS:detection_tensors"
  input_side_packet: "ANCHORS:anchors" output_stream: "DETECTIONS:unfiltered_detections"
  options: { [mediapipe.TensorsToDetectionsCalculatorOptions.ext] { num_classes: 1 num_boxes: 2254
    num_coords: 12 box_coord_offset: 0 keypoint_coord_offset: 4 num_keypoints: 4
    num_values_per_keypoint: 2 sigmoid_score: true score_clipping_thresh: 100.0
    reverse_output_order: true x_scale: 224.0 y_scale: 224.0 h_scale: 224.0 w_scale: 224.0
    min_score_thresh: %(min_score)f } } }
node { calculator: "NonMaxSuppressionCalculator" input_stream: "unfiltered_detections"
  output_stream: "filtered_detections"
  options: { [mediapipe.NonMaxSuppressionCalculatorOptions.ext] { min_suppression_threshold: 0.3
    overlap_type: INTERSECTION_OVER_UNION algorithm: WEIGHTED } } }
node { calculator: "DetectionLetterboxRemovalCalculator" input_stream: "DETECTIONS:filtered_detections"
  input_stream: "LETTERBOX_PADDING:letterbox_padding" output_stream: "DETECTIONS:detections" }
"""

_LANDMARK_GRAPH = """
input_stream: "image"
input_stream: "roi"
input_side_packet: "model_complexity"
output_stream: "landmarks"
output_stream: "auxiliary"
node { calculator: "PoseLandmarkByRoiCpu" input_side_packet: "MODEL_COMPLEXITY:model_complexity"
  input_stream: "IMAGE:image" input_stream: "ROI:roi" output_stream: "LANDMARKS:landmarks"
  output_stream: "AUXILIARY_LANDMARKS:auxiliary" }
"""


def _import_mediapipe():
    try:
        with _captured_stderr():
            import mediapipe
            from mediapipe.framework.formats import detection_pb2, landmark_pb2, rect_pb2
            from mediapipe.python import packet_creator
            from mediapipe.python._framework_bindings import (
                _packet_getter, calculator_graph, image_frame, resource_util,
            )
    except ImportError as exc:
        raise InputError(f"the MediaPipe pose detector is not available ({exc}); {EXTRA_HINT}") from None
    version = getattr(mediapipe, "__version__", "?")
    model = os.path.join(os.path.dirname(mediapipe.__file__), "modules", "pose_landmark",
                         "pose_landmark_full.tflite")
    if not os.path.isfile(model):
        raise InputError(f"mediapipe {version} ships no BlazePose models (0.10.30 and later, 1.x); "
                         f"{EXTRA_HINT}")
    return dict(mp=mediapipe, detection_pb2=detection_pb2, landmark_pb2=landmark_pb2,
                rect_pb2=rect_pb2, packet_creator=packet_creator, getter=_packet_getter,
                calculator_graph=calculator_graph, image_frame=image_frame,
                resource_util=resource_util, version=version)


class _Graph:
    """A MediaPipe calculator graph fed one frame at a time; outputs as packets."""

    def __init__(self, mp: dict, config: str, outputs: tuple[str, ...], side_packets=None):
        self._mp = mp
        root = os.path.dirname(os.path.dirname(mp["mp"].__file__))
        mp["resource_util"].set_resource_dir(root)
        self._out: dict = {}
        with _captured_stderr():
            self._graph = mp["calculator_graph"].CalculatorGraph(graph_config=config)
            for name in outputs:
                self._graph.observe_output_stream(name, self._keep, True)
            self._graph.start_run(side_packets or {})
        self._ts = 0
        self._first = True

    def _keep(self, stream, packet):
        self._out[stream] = packet

    def run(self, inputs: dict) -> dict:
        self._out.clear()
        self._ts += 33333
        for name, packet in inputs.items():
            self._graph.add_packet_to_input_stream(stream=name, packet=packet.at(self._ts))
        if self._first:  # the first run initialises the TFLite delegates, which print
            with _captured_stderr():
                self._graph.wait_until_idle()
            self._first = False
        else:
            self._graph.wait_until_idle()
        return {k: v for k, v in self._out.items() if not v.is_empty()}

    def protos(self, packet, cls, many: bool):
        getter = self._mp["getter"]
        if many:
            return [cls.FromString(s) for s in getter._get_serialized_proto_list(packet)]
        return cls.FromString(getter._get_serialized_proto(packet))

    def close(self):
        if self._graph is not None:
            with contextlib.suppress(Exception), _captured_stderr():
                self._graph.close()
            self._graph = None


def _image_packet(mp: dict, frame: np.ndarray):
    return mp["packet_creator"].create_image_frame(
        np.ascontiguousarray(frame), image_format=mp["image_frame"].ImageFormat.SRGB)


class BlazePoseDetector:
    """Every person BlazePose's detector finds in a frame (score >= ``min_score``)."""

    name = "blazepose-detector"

    def __init__(self, min_score: float = 0.5):
        self._mp = _import_mediapipe()
        self.version = self._mp["version"]
        self._graph = _Graph(self._mp, _DETECTOR_GRAPH % {"min_score": float(min_score)},
                             ("detections",))

    def detect(self, frame: np.ndarray) -> list[Candidate]:
        height, width = frame.shape[:2]
        out = self._graph.run({"image": _image_packet(self._mp, frame)})
        if "detections" not in out:
            return []
        found = []
        for det in self._graph.protos(out["detections"], self._mp["detection_pb2"].Detection, True):
            kps = det.location_data.relative_keypoints
            if len(kps) < 2:
                continue
            hip = (kps[0].x * width - 0.5, kps[0].y * height - 0.5)
            top = (kps[1].x * width - 0.5, kps[1].y * height - 0.5)
            box = box_from_points(hip, top, ROI_SCALE)
            if box.half > 0:
                found.append(Candidate(box, float(det.score[0]) if det.score else 0.0))
        return found

    def close(self):
        self._graph.close()


class BlazePoseLandmarks:
    """33 BlazePose landmarks in a region, mapped to COCO-17 (visibility as the score)."""

    name = "blazepose"

    def __init__(self, region_scales=REGION_SCALES):
        self._mp = _import_mediapipe()
        self.version = self._mp["version"]
        self.region_scales = tuple(region_scales)
        side = {"model_complexity": self._mp["packet_creator"].create_int(1)}
        self._graph = _Graph(self._mp, _LANDMARK_GRAPH, ("landmarks", "auxiliary"), side)

    def estimate(self, frame: np.ndarray, box: Box) -> PoseOutput | None:
        runs = [self._run(frame, Box(box.cx, box.cy, box.half * f, box.rotation))
                for f in self.region_scales]
        runs = [r for r in runs if r is not None]
        if not runs:
            return None
        kp = np.mean([r[0] for r in runs], axis=0)
        sc = np.mean([r[1] for r in runs], axis=0)
        height, width = frame.shape[:2]
        inside = (kp[:, 0] >= -0.5) & (kp[:, 0] <= width - 0.5) & (kp[:, 1] >= -0.5) & (kp[:, 1] <= height - 0.5)
        sc = np.where(inside, np.clip(sc, 0, 1), 0.0)
        return PoseOutput(kp.astype(np.float32), sc.astype(np.float32), runs[0][2])

    def _run(self, frame: np.ndarray, box: Box):
        """(COCO-17 keypoints, visibilities, predicted next region) in one region, or None."""
        height, width = frame.shape[:2]
        roi = self._mp["rect_pb2"].NormalizedRect(
            x_center=(box.cx + 0.5) / width, y_center=(box.cy + 0.5) / height,
            width=2 * box.half / width, height=2 * box.half / height, rotation=box.rotation)
        out = self._graph.run({"image": _image_packet(self._mp, frame),
                               "roi": self._mp["packet_creator"].create_proto(roi)})
        if "landmarks" not in out:
            return None
        cls = self._mp["landmark_pb2"].NormalizedLandmarkList
        marks = self._graph.protos(out["landmarks"], cls, False).landmark
        if len(marks) < 33:
            return None
        idx = list(BLAZEPOSE_TO_COCO17)
        kp = np.array([[m.x * width - 0.5, m.y * height - 0.5] for m in marks], np.float64)[idx]
        vis = np.array([m.visibility for m in marks], np.float64)[idx]
        predicted = None
        if "auxiliary" in out:
            aux = self._graph.protos(out["auxiliary"], cls, False).landmark
            if len(aux) >= 2:
                predicted = box_from_points((aux[0].x * width - 0.5, aux[0].y * height - 0.5),
                                            (aux[1].x * width - 0.5, aux[1].y * height - 0.5), ROI_SCALE)
        return kp, vis, predicted

    def close(self):
        self._graph.close()

"""2D human pose from a reference video: ``run.detect_video(path, DetectOptions()) -> DetectResult``.

Backends: MediaPipe BlazePose (the models inside ``mediapipe`` 0.10.14, the ``detect`` extra), or
a user-supplied top-down ONNX pose model such as RTMPose (``pose_model=...``, onnxruntime), whose
person regions come from BlazePose's detector when mediapipe is installed and from the whole frame
otherwise. One person is followed (see ``track.Tracker``); joints below ``min_score`` are missing,
gaps of at most ``max_gap`` frames are interpolated, lost frames are reported
(``postprocess``). The result is a validated ``PoseClip`` (clip.npz v1) at the video's size and fps.
"""

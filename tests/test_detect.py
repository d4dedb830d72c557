"""`fpengine detect` and `generate --video`: a real detector on a real photograph.

The MediaPipe tests need the ``detect`` extra (README's test command installs it; CI=true makes
its absence a failure instead of a skip). The photograph is scikit-image's ``astronaut`` (a
packaged file, no download), placed on a grey canvas so that every crop shows all of it.
"""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from engine.cli.app import main
from engine.detect.run import DetectOptions, detect_frames
from engine.detect.onnx_pose import OnnxPose
from engine.detect.postprocess import clean, fill_gaps, format_ranges, ranges, threshold
from engine.detect.track import Box, Candidate, Tracker
from engine.video import read_video, write_video
from finephys.poses.clip import load_clip
from finephys.errors import InputError

FACE, SHOULDERS, ELBOWS = [0, 1, 2, 3, 4], [5, 6], [7, 8]


def _mediapipe():
    if os.environ.get("CI"):
        import mediapipe  # noqa: F401  (CI installs the detect extra: missing is a failure)
        return
    pytest.importorskip("mediapipe", reason="the detect extra is not installed "
                                            "(python -m pip install -e '.[detect]')")


# ---- post-processing and tracking (no detector needed) ----------------------------------------

def test_threshold_and_gap_filling():
    t = 14
    kp = np.zeros((t, 17, 2), np.float32)
    kp[:, :, 0] = np.arange(t)[:, None] * 10.0
    kp[:, :, 1] = 5.0
    sc = np.full((t, 17), 0.9, np.float32)
    sc[3:5, 0] = 0.1  # 2-frame gap (below threshold) -> filled
    sc[6:13, 1] = 0.0  # 7-frame gap -> too long, stays missing
    sc[0:2, 2] = 0.0  # leading gap -> stays missing
    sc[5, 3] = 0.5  # bounding scores 0.9 and 0.5 -> the filled frame gets... (no gap here)
    found = np.ones(t, bool)
    found[9] = False  # a lost frame: every joint is missing there, then 1-frame gaps are filled
    c = clean(kp, sc, found, min_score=0.3, max_gap=5)
    np.testing.assert_allclose(c.keypoints[3:5, 0], kp[3:5, 0])  # linear motion is recovered
    assert c.filled[3:5, 0].all() and (c.scores[3:5, 0] == pytest.approx(0.9))
    assert (c.scores[6:13, 1] == 0).all() and (c.keypoints[6:13, 1] == 0).all()
    assert (c.scores[:2, 2] == 0).all()
    assert c.filled[9, 4] and c.scores[9, 4] == pytest.approx(0.9)
    assert c.below == 2
    kp2, sc2 = threshold([[[np.nan, 1.0]]], [[0.9]], 0.3)
    assert sc2[0, 0] == 0 and kp2[0, 0].tolist() == [0, 0]
    k3, s3, f3 = fill_gaps(kp, np.where(np.arange(t)[:, None] == 4, 0, sc), max_gap=0)
    assert not f3.any()
    assert ranges([9, 3, 4, 5]) == [(3, 5), (9, 9)] and format_ranges(ranges([3, 4, 5, 9])) == "3-5, 9"


def test_tracker_largest_id_and_reacquire():
    small, big = Candidate(Box(50, 50, 20), 0.9), Candidate(Box(150, 60, 40), 0.6)
    assert Tracker("largest").choose(0, [small, big]) == big.box
    assert Tracker(0).choose(0, [big, small]) == small.box  # IDs count from the left
    assert Tracker("1").choose(0, [big, small]) == big.box
    with pytest.raises(InputError, match=r"--person 2: frame 4.*2 people \(IDs 0-1"):
        Tracker(2).choose(4, [small, big])
    with pytest.raises(InputError, match="expected 'largest' or a person ID"):
        Tracker("tallest")
    tr = Tracker(0)
    assert tr.choose(0, []) is None and not tr.started
    box = tr.choose(1, [small, big])
    tr.update(True, box, Box(52, 50, 20))
    moved = Candidate(Box(55, 52, 21), 0.8)
    assert tr.choose(2, [big, moved]) == moved.box  # overlap wins
    tr.update(True, moved.box, None)
    assert tr.choose(3, [big]) == moved.box  # no overlap: the pose model's own prediction
    tr.update(False, moved.box, None)
    assert tr.choose(4, [big]) is None  # ID mode: nobody near the last place
    assert tr.choose(5, [Candidate(Box(70, 50, 20), 0.7), big]).cx == 70


# ---- ONNX pose models (a tiny model built here, run with onnxruntime) --------------------------

def _onnx_model(path, kind="heatmap", inputs=1, channels=3, size=(64, 48), k=17, outputs=None):
    """A 'pose model' whose every joint is the brightest red spot of its crop."""
    from onnx import TensorProto, helper, numpy_helper

    h, w = size
    ins = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, channels, h, w])
           for i in range(inputs)]
    nodes, inits = [], [numpy_helper.from_array(np.array([0], np.int64), "c0"),
                        numpy_helper.from_array(np.array([1], np.int64), "c1"),
                        numpy_helper.from_array(np.array([1, k, 1], np.int64), "rep3"),
                        numpy_helper.from_array(np.array([1, k, 1, 1], np.int64), "rep4")]
    nodes.append(helper.make_node("Slice", ["x0", "c0", "c1", "c1"], ["red"]))  # (1,1,h,w)
    if kind == "heatmap":
        nodes.append(helper.make_node("MaxPool", ["red"], ["pool"], kernel_shape=[4, 4], strides=[4, 4]))
        nodes.append(helper.make_node("Tile", ["pool", "rep4"], ["heatmaps"]))
        outs = [helper.make_tensor_value_info("heatmaps", TensorProto.FLOAT, [1, k, h // 4, w // 4])]
    else:
        inits.append(numpy_helper.from_array(np.array([1, 1, 2], np.float32), "scales"))
        for name, axis, n in (("simcc_x", 2, w), ("simcc_y", 3, h)):
            nodes.append(helper.make_node("ReduceMax", ["red"], [f"{name}_m"], axes=[axis], keepdims=0))
            nodes.append(helper.make_node("Resize", [f"{name}_m", "", "scales"], [f"{name}_r"], mode="nearest"))
            nodes.append(helper.make_node("Tile", [f"{name}_r", "rep3"], [name]))
        outs = [helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, [1, k, 2 * w]),
                helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, [1, k, 2 * h])]
    if outputs is not None:
        outs = outputs
    graph = helper.make_graph(nodes, "spot", ins, outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def _spot_frames(t=6, size=(96, 128)):
    frames, where = [], []
    for i in range(t):
        f = np.full(size + (3,), 20, np.uint8)
        x, y = 30 + 9 * i, 25 + 6 * i
        f[y - 2:y + 3, x - 2:x + 3] = 255
        frames.append(f)
        where.append((x, y))
    return np.stack(frames), np.array(where, np.float32)


@pytest.mark.parametrize("kind,tol", [("heatmap", 6.0), ("simcc", 2.0)])
def test_onnx_pose_model_follows_the_spot(tmp_path, kind, tol):
    model = _onnx_model(tmp_path / f"{kind}.onnx", kind)
    frames, where = _spot_frames()
    opts = DetectOptions(pose_model=model, pose_model_norm="unit", person_detector="none")
    r = detect_frames(frames, 25.0, opts)
    assert r.clip.image_size == (96, 128) and r.clip.fps == 25.0 and r.found.all()
    err = np.abs(r.clip.keypoints - where[:, None, :]).max()
    assert err <= tol, (kind, err)
    assert "ONNX model" in r.backend and kind in r.backend


def test_heatmap_peaks_find_a_gaussian_to_a_fraction_of_a_pixel():
    """A peak drawn as the judge is trained to draw it (a Gaussian of sigma 1) comes back within
    0.01 heatmap pixels, where the quarter shift alone is off by up to 0.375; a flat top moves
    toward its centre; a peak on the border and a map with nothing positive near its top fall
    back to the quarter shift toward the higher neighbour."""
    from engine.detect.peaks import heatmap_peaks

    rng = np.random.default_rng(0)
    g = np.arange(32.0)
    where = rng.uniform(4, 27, size=(17, 2))  # away from the border, where the smoothing pads
    hm = np.exp(-((g[None, None, :] - where[:, 0, None, None]) ** 2
                  + (g[None, :, None] - where[:, 1, None, None]) ** 2) / 2)
    x, y, score = heatmap_peaks(hm.astype(np.float32))
    assert np.abs(np.stack([x, y], 1) - where).max() < 0.01
    assert np.allclose(score, hm.reshape(17, -1).max(1))
    flat = np.zeros((3, 16, 16))
    flat[0, 6:9, 6:9] = 1.0  # a plateau centred on (7, 7); its first maximum is (6, 6)
    flat[1, 0, 5] = 1.0  # on the border row
    flat[2] -= 1.0
    flat[2, 4, 3] = -0.5  # nothing positive
    flat[2, 4, 4] = -0.2
    x, y, _ = heatmap_peaks(flat)
    assert 6.5 < x[0] <= 7.0 and abs(y[0] - x[0]) < 1e-9
    assert x[1:].tolist() == [5.0, 3.75] and y[1:].tolist() == [0.0, 4.0]
    # near the border the step is taken on the map as it is (smoothing would pad it and pull the
    # peak toward the edge), so a wide Gaussian there is still found exactly
    for x0 in (1.0, 1.3, 2.2, 29.6, 30.2):
        wide = np.exp(-((g[None, None, :] - x0) ** 2 + (g[None, :, None] - 15.3) ** 2) / 8)
        x, y, _ = heatmap_peaks(wide)
        assert abs(x[0] - x0) < 0.01 and abs(y[0] - 15.3) < 0.01, (x0, x, y)
    for shape in ((2, 1, 5), (2, 5, 1), (2, 1, 1), (2, 2, 2)):  # maps too small for a step: arg-max, quarter shift
        x, y, _ = heatmap_peaks(np.random.default_rng(1).random(shape))
        assert x.shape == (2,) and (0 <= x).all() and (x <= shape[2] - 1).all() and (y <= shape[1] - 1).all()


def test_an_fps_no_clip_can_hold_is_refused_with_the_options():
    from engine.detect.run import DetectOptions

    with pytest.raises(InputError, match=r"--fps 1e-300: expected a frame rate from 0\.1 to 1000"):
        DetectOptions(fps=1e-300).checked()
    assert DetectOptions(fps=25.0).checked().fps == 25.0


def test_onnx_pose_model_is_checked(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    cases = [
        (bad, "cannot be loaded by onnxruntime"),
        (_onnx_model(tmp_path / "a.onnx", inputs=2), "has 2 inputs"),
        (_onnx_model(tmp_path / "b.onnx", channels=1), r"expected \(1, 3, H, W\)"),
        (_onnx_model(tmp_path / "c.onnx", k=5), "has 5 keypoints"),
    ]
    from onnx import TensorProto, helper

    three = [helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, [1, 17, 96]),
             helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, [1, 17, 128]),
             helper.make_tensor_value_info("red", TensorProto.FLOAT, [1, 1, 64, 48])]
    cases.append((_onnx_model(tmp_path / "d.onnx", "simcc", outputs=three), "expected SimCC outputs"))
    for path, message in cases:
        with pytest.raises(InputError, match=message) as exc:
            OnnxPose(path)
        assert "\n" not in str(exc.value)
    with pytest.raises(InputError, match="file not found"):
        OnnxPose(tmp_path / "missing.onnx")


def test_missing_extra_is_one_clear_line(tmp_path, monkeypatch):
    import engine.detect.run as det

    monkeypatch.setattr(det, "mediapipe_available", lambda: False)
    frames, _ = _spot_frames(3)
    with pytest.raises(InputError, match=r"pip install 'fpengine\[detect\]'"):
        detect_frames(frames, 25.0)
    path = tmp_path / "v.mp4"
    write_video(frames, path, 25.0)
    r = CliRunner().invoke(main, ["detect", "--video", str(path), "--out", str(tmp_path / "c.npz")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "detect extra" in r.output


# ---- MediaPipe BlazePose on the astronaut ---------------------------------------------------

def _canvas(pad=64):
    from skimage import data

    img = data.astronaut()
    canvas = np.full((512 + 2 * pad, 512 + 2 * pad, 3), 127, np.uint8)
    canvas[pad:pad + 512, pad:pad + 512] = img
    return canvas


def _moving_crops(canvas, num=8, out=256):
    """Square crops that move and grow (every one holds the whole photo), resized to ``out``."""
    from PIL import Image

    c = canvas.shape[0]
    frames, windows = [], []
    for t in range(num):
        size = int(c * 0.8) + 8 * t
        x0 = min(max((c - size) // 2 + int(12 * np.sin(t)), 0), c - size)
        y0 = min(max((c - size) // 2 + int(10 * np.cos(t)), 0), c - size)
        crop = Image.fromarray(canvas).crop((x0, y0, x0 + size, y0 + size))
        frames.append(np.asarray(crop.resize((out, out), Image.Resampling.BILINEAR)))
        windows.append((x0, y0, out / size))
    return np.stack(frames), windows


@pytest.fixture(scope="module")
def astronaut_video(tmp_path_factory):
    _mediapipe()
    canvas = _canvas()
    frames, windows = _moving_crops(canvas)
    path = tmp_path_factory.mktemp("astro") / "astronaut.mp4"
    write_video(frames, path, 12.0, crf=12)
    return canvas, frames, windows, path


def test_astronaut_video_matches_the_still(astronaut_video):
    """Face, shoulders and elbows are found in every frame, where the same detector puts them in
    the still (the canvas, at about the frames' scale), moved and scaled by the crop.

    Measured (shoulder width ~89 px of these 256 px frames): face within 3 %, shoulders 6 %,
    elbows 19 %. BlazePose's full-body region is extrapolated here from hips out of view (a
    half-body photo), so the model sees the person at ~1/5 of its input and the arms, cut by the
    photo's edge and the helmet, move by a few of its input pixels (~2.4 px of these frames each)
    with small changes of the region. Tolerances: 4 / 8 / 25 % (about 3.5, 7 and 22 px).
    """
    from PIL import Image

    canvas, frames, windows, _ = astronaut_video
    opts = DetectOptions(min_score=0.1)  # her left elbow (photo edge, under the helmet) ~0.3-0.5
    n = round(canvas.shape[0] * 0.43)
    k = n / canvas.shape[0]
    small = np.asarray(Image.fromarray(canvas).resize((n, n), Image.Resampling.BILINEAR))
    still = detect_frames(np.stack([small] * 3), 12.0, opts)
    joints = FACE + SHOULDERS + ELBOWS
    assert (still.coco_scores[0, joints] >= 0.3).all(), still.coco_scores[0]
    ref = (still.coco_keypoints[0] + 0.5) / k - 0.5  # in canvas pixels
    r = detect_frames(frames, 12.0, opts)
    assert r.found.all() and r.clip.image_size == (256, 256)
    assert (r.clip.scores[:, joints] >= 0.3).all()
    for t, (x0, y0, s) in enumerate(windows):
        expected = (ref + 0.5 - [x0, y0]) * s - 0.5
        err = np.linalg.norm(r.clip.keypoints[t] - expected, axis=1)
        width = np.linalg.norm(expected[5] - expected[6])
        for group, frac in ((FACE, 0.04), (SHOULDERS, 0.08), (ELBOWS, 0.25)):
            assert err[group].max() <= frac * width, (t, group, err[group], width)


def test_cli_detect_writes_clip_preview_and_report(astronaut_video, tmp_path):
    _, frames, _, video = astronaut_video
    out, prev, rep = tmp_path / "clip.npz", tmp_path / "overlay.mp4", tmp_path / "r.json"
    args = ["detect", "--video", str(video), "--out", str(out), "--preview", str(prev),
            "--report", str(rep)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "person found in all 8 frames" in r.output and "MediaPipe 0.10.14" in r.output
    clip = load_clip(out)
    assert clip.layout == "coco17" and clip.image_size == (256, 256) and clip.fps == 12.0
    assert clip.num_frames == 8 and (clip.scores[:, FACE] > 0).all()
    overlay = read_video(prev)
    assert overlay.shape == frames.shape and np.abs(overlay.astype(int) - frames).mean() > 0.5
    report = json.loads(rep.read_text())
    assert report["lost_frames"] == [] and len(report["regions"]) == 8
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "already exists" in r.output
    r = CliRunner().invoke(main, ["detect", "--video", str(video), "--out", str(tmp_path / "h.npz"),
                                  "--layout", "h36m17"])
    assert r.exit_code == 0, r.output
    assert load_clip(tmp_path / "h.npz").layout == "h36m17"


def test_person_choice_with_two_people():
    _mediapipe()
    from PIL import Image
    from skimage import data

    img = data.astronaut()
    frame = np.full((224, 400, 3), 120, np.uint8)
    frame[64:, 10:170] = np.asarray(Image.fromarray(img).resize((160, 160)))
    frame[112:, 278:390] = np.asarray(Image.fromarray(img[:, ::-1]).resize((112, 112)))
    frames = np.stack([frame] * 3)
    nose = {p: detect_frames(frames, 10, DetectOptions(person=p)).clip.keypoints[:, 0, 0]
            for p in ("largest", 0, 1)}
    assert (nose["largest"] < 170).all() and (nose[0] < 170).all() and (nose[1] > 278).all()
    with pytest.raises(InputError, match="--person 2: frame 0.*2 people"):
        detect_frames(frames, 10, DetectOptions(person=2))


def test_no_person_corrupt_and_missing_videos(tmp_path):
    _mediapipe()
    rng = np.random.default_rng(0)
    empty = tmp_path / "empty.mp4"
    write_video(rng.integers(90, 140, (5, 96, 128, 3), dtype=np.uint8), empty, 10.0)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(empty.read_bytes()[:300])
    cases = [(empty, "no person found in any of its 5 frames"),
             (corrupt, "cannot be read as a video"), (truncated, "cannot be read as a video"),
             (tmp_path / "missing.mp4", "does not exist"), (tmp_path, "is a folder")]
    for video, message in cases:
        out = tmp_path / "clip.npz"
        r = CliRunner().invoke(main, ["detect", "--video", str(video), "--out", str(out)])
        assert r.exit_code == 2, (video, r.output)
        assert r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
        assert message in r.output and not out.exists()


def test_generate_from_video(astronaut_video, tmp_path, demo_ckpt):
    _, _, _, video = astronaut_video
    out, stages, clip = tmp_path / "v.mp4", tmp_path / "s.npz", tmp_path / "c.npz"
    small = ["--frames", "4", "--height", "64", "--width", "64", "--steps", "1"]
    args = ["generate", "--video", str(video), "--prompt", "an astronaut", "--ckpt", str(demo_ckpt),
            "--out", str(out), "--save-poses", str(stages), "--save-clip", str(clip), *small]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert read_video(out).shape[0] == 4
    s = np.load(stages, allow_pickle=False)
    assert s["detected_keypoints"].shape == (8, 17, 2) and s["detected_found"].all()
    assert str(s["detected_layout"]) == "coco17" and "s_fused" in s
    assert load_clip(clip).num_frames == 8
    both = ["generate", "--video", str(video), "--poses", "examples/walk.npz", "--prompt", "x",
            "--out", str(tmp_path / "b.mp4")]
    r = CliRunner().invoke(main, both)
    assert r.exit_code == 2 and "exactly one of --poses" in r.output
    r = CliRunner().invoke(main, ["generate", "--poses", "examples/walk.npz", "--person", "1",
                                  "--prompt", "x", "--out", str(tmp_path / "p.mp4")])
    assert r.exit_code == 2 and "--person goes with --video" in r.output

import numpy as np
import pytest

from finephys.poses.clip import PoseClip, load_clip, resample, save_clip, to_layout
from finephys.errors import InputError

T, J = 10, 17


def arrays(**over):
    rng = np.random.default_rng(0)
    data = {
        "keypoints": rng.uniform(0, 200, (T, J, 2)).astype(np.float32),
        "scores": rng.uniform(0.2, 1, (T, J)).astype(np.float32),
        "layout": np.array("h36m17"),
        "image_size": np.array([240, 320]),
        "fps": np.array(25.0),
        "format_version": np.array(1),
    }
    data.update(over)
    return {k: v for k, v in data.items() if v is not None}


def write(tmp_path, name="clip.npz", **over):
    path = tmp_path / name
    np.savez(path, **arrays(**over))
    return path


def test_round_trip(tmp_path):
    a = arrays()
    clip = PoseClip(a["keypoints"], a["scores"], "h36m17", (240, 320), 25.0,
                    camera_matrix=np.diag([300.0, 300.0, 1.0]), dist_coeffs=np.zeros(5))
    path = save_clip(clip, tmp_path / "c.npz")
    back = load_clip(path)
    np.testing.assert_array_equal(back.keypoints, clip.keypoints)
    np.testing.assert_array_equal(back.scores, clip.scores)
    assert back.layout == "h36m17" and back.image_size == (240, 320) and back.fps == 25.0
    assert back.num_frames == T and back.keypoints.dtype == np.float32
    np.testing.assert_array_equal(back.camera_matrix, clip.camera_matrix)
    assert back.dist_coeffs.shape == (5,)
    with np.load(path) as z:
        assert int(z["format_version"]) == 1 and str(z["layout"]) == "h36m17"


def test_xy_score_form_and_missing_joints(tmp_path):
    a = arrays()
    kp3 = np.concatenate([a["keypoints"], a["scores"][..., None]], axis=-1)
    kp3[2, 5, 2] = 0.0
    kp3[2, 5, :2] = np.nan  # ignored: the joint is missing
    clip = load_clip(write(tmp_path, keypoints=kp3, scores=None))
    assert clip.keypoints.shape == (T, J, 2)
    np.testing.assert_allclose(clip.scores[3], a["scores"][3])
    assert (clip.keypoints[2, 5] == 0).all() and np.isfinite(clip.keypoints).all()


BAD = [
    (dict(keypoints=None), "missing key 'keypoints'"),
    (dict(scores=None), "missing key 'scores'"),
    (dict(layout=None), "missing key 'layout'"),
    (dict(image_size=None), "missing key 'image_size'"),
    (dict(fps=None), "missing key 'fps'"),
    (dict(keypoints=np.full((T, J, 2), "a")), "key 'keypoints' has dtype"),
    (dict(scores=np.ones((T, J), bool)), "key 'scores' has dtype"),
    (dict(keypoints=np.zeros((T, J))), r"key 'keypoints' has shape \(10, 17\)"),
    (dict(keypoints=np.zeros((T, J, 4))), r"'keypoints' has shape \(10, 17, 4\)"),
    (dict(scores=np.ones((T, 16))), r"key 'scores' has shape \(10, 16\), expected \(T, J\) = \(10, 17\)"),
    (dict(keypoints=np.zeros((T, 16, 2)), scores=np.ones((T, 16))), r"'keypoints' has shape \(10, 16, 2\)"),
    (dict(keypoints=np.zeros((T, J, 3))), "key 'scores' is present"),
    (dict(layout=np.array("smpl")), "key 'layout' is 'smpl'"),
    (dict(layout=np.array(3)), "key 'layout' has dtype"),
    (dict(keypoints=np.full((T, J, 2), np.nan)), "key 'keypoints' is .* at frame 0, joint 0"),
    (dict(scores=np.full((T, J), np.inf)), "key 'scores' is inf"),
    (dict(scores=np.full((T, J), 1.5)), r"key 'scores' is 1.5 .*\[0, 1\]"),
    (dict(scores=np.full((T, J), -0.1)), "key 'scores' is -0.1"),
    (dict(scores=np.zeros((T, J))), "key 'scores' are all 0"),
    (dict(keypoints=np.zeros((2, J, 2)), scores=np.ones((2, J))), "at least 3 frames"),
    (dict(image_size=np.array([240, 0])), "key 'image_size'"),
    (dict(image_size=np.array([240.0, 320.0])), "key 'image_size' has dtype"),
    (dict(image_size=np.array([1, 2, 3])), "key 'image_size'"),
    (dict(fps=np.array(0.0)), "key 'fps' is 0.0"),
    (dict(fps=np.array(np.nan)), "key 'fps' is nan"),
    (dict(fps=np.array(1e-308)), r"key 'fps' is 1e-308, expected a frame rate from 0\.1 to 1000$"),
    (dict(fps=np.array(1e9)), r"key 'fps' is 1e\+09, expected a frame rate from 0\.1 to 1000$"),
    (dict(fps=np.array([25.0, 30.0])), "key 'fps' has shape"),
    (dict(format_version=np.array(2)), "key 'format_version' is 2, expected 1"),
    (dict(camera_matrix=np.eye(4)), r"key 'camera_matrix' is .*last row \(0, 0, 1\)"),
    (dict(camera_matrix=np.diag([500.0, 500.0, 0.0])), r"key 'camera_matrix' is .*last row \(0, 0, 1\)"),
    (dict(image_size=np.array([1, 1])), r"key 'image_size' is \[1, 1\], expected .* from 16 to 32768"),
    (dict(image_size=np.array([100000, 100000])), "key 'image_size' is \\[100000, 100000\\]"),
    (dict(keypoints=np.full((T, J, 2), 1e30)), r"key 'keypoints' is \(1e\+30, 1e\+30\) at frame 0, joint 0, expected "
                                               r"pixel coordinates of the \d+x\d+ image"),
    (dict(dist_coeffs=np.zeros(6)), r"key 'dist_coeffs' has shape \(6,\)"),
    (dict(extra=np.zeros(1)), "unknown key 'extra'"),
]


@pytest.mark.parametrize("over,message", BAD)
def test_bad_inputs(tmp_path, over, message):
    path = write(tmp_path, **over)
    with pytest.raises(InputError, match=message) as info:
        load_clip(path)
    text = str(info.value)
    assert "\n" not in text and str(path) in text


def test_optional_keys_accepted(tmp_path):
    for n in (4, 5, 8):
        clip = load_clip(write(tmp_path, f"d{n}.npz", dist_coeffs=np.zeros(n),
                               camera_matrix=np.diag([1.0, 1.0, 1.0]), format_version=None))
        assert clip.dist_coeffs.shape == (n,)


def test_bad_files(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        load_clip(tmp_path / "nope.npz")
    text = tmp_path / "text.npz"
    text.write_text("hello")
    with pytest.raises(InputError, match="not an npz"):
        load_clip(text)
    npy = tmp_path / "one.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(InputError, match="single .npy array"):
        load_clip(npy)
    good = write(tmp_path)
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="cut.npz"):
        load_clip(cut)
    obj = tmp_path / "obj.npz"
    np.savez(obj, **arrays(layout=np.array(["h36m17", None], dtype=object)))
    with pytest.raises(InputError, match="key 'layout' holds Python objects"):
        load_clip(obj)
    # damaged bytes inside one compressed member
    packed = tmp_path / "packed.npz"
    np.savez_compressed(packed, **arrays())
    raw = bytearray(packed.read_bytes())
    at = raw.index(b"scores.npy") + 60
    raw[at:at + 8] = bytes(b ^ 0xFF for b in raw[at:at + 8])
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="key 'scores' is corrupt"):
        load_clip(bad)


def test_save_refuses_and_is_atomic(tmp_path, monkeypatch):
    clip = load_clip(write(tmp_path))
    target = tmp_path / "out.npz"
    save_clip(clip, target)
    with pytest.raises(InputError, match="already exists"):
        save_clip(clip, target)
    save_clip(clip, target, overwrite=True)
    with pytest.raises(InputError, match="parent folder"):
        save_clip(clip, tmp_path / "missing" / "x.npz")
    before = target.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(np, "savez_compressed", boom)
    with pytest.raises(RuntimeError):
        save_clip(clip, target, overwrite=True)
    with pytest.raises(RuntimeError):
        save_clip(clip, tmp_path / "new.npz")
    assert target.read_bytes() == before and not (tmp_path / "new.npz").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.npz", "out.npz"]


def test_poseclip_validates():
    a = arrays()
    with pytest.raises(InputError, match="PoseClip: field 'scores'"):
        PoseClip(a["keypoints"], a["scores"][:, :5], "h36m17", (240, 320), 25.0)
    with pytest.raises(InputError, match="field 'fps'"):
        PoseClip(a["keypoints"], a["scores"], "h36m17", (240, 320), -1)


def test_to_layout():
    kp = np.zeros((4, 17, 2), np.float32)
    kp[:, 9] = (5.0, 7.0)  # COCO left wrist
    clip = PoseClip(kp, np.ones((4, 17), np.float32), "coco17", (64, 64), 10.0)
    h = to_layout(clip, "h36m17")
    assert h.layout == "h36m17" and (h.keypoints[:, 13] == (5.0, 7.0)).all()
    with pytest.raises(InputError):
        to_layout(h, "coco17")


def test_resample():
    t = np.arange(9, dtype=np.float32)
    kp = np.zeros((9, 17, 2), np.float32)
    kp[..., 0] = t[:, None] * 3  # x moves 3 px per frame
    sc = np.ones((9, 17), np.float32)
    sc[4, 2] = 0.0  # joint 2 missing at frame 4
    sc[:, 3] = np.linspace(0.2, 1.0, 9)
    clip = PoseClip(kp, sc, "h36m17", (64, 64), 8.0)
    assert resample(clip, 8.0) is clip
    up = resample(clip, 16.0)
    assert up.num_frames == 17 and up.fps == 16.0
    np.testing.assert_allclose(up.keypoints[:, 0, 0], np.arange(17) * 1.5)
    # joint 2: frames 7 (3.5) and 9 (4.5) neighbour the missing source frame; 8 sits on it
    assert (up.scores[[7, 8, 9], 2] == 0).all() and (up.keypoints[[7, 8, 9], 2] == 0).all()
    assert up.scores[6, 2] == 1 and up.scores[10, 2] == 1
    np.testing.assert_allclose(up.scores[1, 3], 0.25)
    down = resample(clip, 3.0)  # round(8 * 3 / 8) + 1 = 4 frames at source 0, 8/3, 16/3, 8
    assert down.num_frames == 4
    np.testing.assert_allclose(down.keypoints[:, 0, 0], [0, 8, 16, 24], rtol=1e-6)
    with pytest.raises(InputError, match="at least 3 frames"):
        resample(clip, 1.0)
    with pytest.raises(InputError, match="fps"):
        resample(clip, 0.0)


def test_example_walk_clip():
    from pathlib import Path

    clip = load_clip(Path(__file__).resolve().parents[1] / "examples" / "walk.npz")
    assert clip.num_frames == 24 and clip.image_size == (256, 256) and clip.fps == 8.0
    assert clip.layout == "h36m17" and (clip.scores == 1).all()
    assert (clip.keypoints >= 0).all() and (clip.keypoints <= 255).all()


def test_atomic_path_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    import pytest

    from finephys.files import atomic_path, file_mode

    target = tmp_path / "out.json"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("{}")
    assert target.read_text() == "{}" and (target.stat().st_mode & 0o777) == file_mode()
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_scores_a_little_over_one_are_clipped_with_one_warning(tmp_path, caplog):
    """Real heatmap detectors (HRNet) give maxima up to about 1.06: read as 1, said once."""
    path = write(tmp_path, scores=np.full((T, J), 1.06))
    clip = load_clip(path)
    assert clip.scores.max() == 1.0
    warned = [r.getMessage() for r in caplog.records if "clipped to 1" in r.getMessage()]
    assert len(warned) == 1 and "1.06" in warned[0] and str(path) in warned[0]
    with pytest.raises(InputError, match=r"'scores' is 1.2 .*expected values in \[0, 1\]"):
        load_clip(write(tmp_path, scores=np.full((T, J), 1.2)))


def test_a_pipe_or_a_device_is_not_a_clip_file(tmp_path):
    """Both were "file not found"; a pipe would be read once, a device may never end."""
    import os

    fifo = tmp_path / "clip.npz"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/null"):
        with pytest.raises(InputError, match=f"^{path}: not a regular file, expected a clip.npz file$"):
            load_clip(path)
    with pytest.raises(InputError, match="file not found"):
        load_clip(tmp_path / "missing.npz")

import numpy as np
import pytest

from engine.video import VideoWriter, read_video, write_video
from finephys.poses.draw import BACKGROUND, SIDE_COLORS, draw_skeleton, render_pose_frames
from finephys.errors import InputError


def pose():
    kp = np.array([[32, 40], [24, 40], [24, 52], [24, 62], [40, 40], [40, 52], [40, 62],
                   [32, 30], [32, 20], [32, 15], [32, 10], [42, 20], [50, 24], [56, 28],
                   [22, 20], [14, 24], [8, 28]], np.float64)
    return kp, np.ones(17)


def test_draw_skeleton_pixels():
    kp, sc = pose()
    sc[16] = 0  # right wrist missing
    kp[16] = np.nan
    img = np.zeros((64, 64, 3), np.uint8)
    out = draw_skeleton(img, kp, sc, radius=2, thickness=2)
    assert out is img
    assert tuple(img[28, 56]) == SIDE_COLORS["left"]  # l_wrist
    assert tuple(img[24, 14]) == SIDE_COLORS["right"]  # r_elbow
    assert tuple(img[10, 32]) == SIDE_COLORS["center"]  # head
    assert tuple(img[46, 24]) == SIDE_COLORS["right"]  # middle of the r_hip - r_knee limb
    assert img[28, 8].sum() == 0 and img[26, 11].sum() == 0  # missing wrist and its limb
    lit = np.argwhere(img.any(axis=2))
    dist = np.min(np.linalg.norm(lit[:, None, ::-1] - kp[None, :16], axis=2), axis=1)
    assert dist.max() < 9  # nothing far from the skeleton
    assert not img[:5].any() and not img[:, 60:].any() and not img[:, :5].any()
    one = draw_skeleton(np.zeros((64, 64, 3), np.uint8), kp, sc, color=(1, 2, 3))
    assert set(map(tuple, one.reshape(-1, 3))) == {(0, 0, 0), (1, 2, 3)}


def test_draw_off_image_and_bad_input():
    kp, sc = pose()
    img = np.zeros((64, 64, 3), np.uint8)
    draw_skeleton(img, kp + 1000, sc)
    assert not img.any()
    with pytest.raises(InputError, match=r"\(17, 2\)"):
        draw_skeleton(img, kp[:5], sc)
    with pytest.raises(InputError, match="uint8"):
        draw_skeleton(img.astype(np.float32), kp, sc)


def test_render_pose_frames():
    kp, sc = pose()
    a = np.stack([kp, kp + 2, kp + 4])
    s = np.ones((3, 17))
    frames = render_pose_frames([a, a], [s, s], (64, 64), titles=["in", "out"])
    assert frames.shape == (3, 64, 128, 3) and frames.dtype == np.uint8
    assert tuple(frames[0, 63, 0]) == BACKGROUND
    assert tuple(frames[0, 28, 56]) == SIDE_COLORS["left"]
    assert tuple(frames[0, 28, 64 + 56]) == SIDE_COLORS["left"]
    assert tuple(frames[2, 32, 60]) == SIDE_COLORS["left"]
    assert (frames[0, :12, :30] != BACKGROUND).any()  # the title
    with pytest.raises(InputError, match="clip 1"):
        render_pose_frames([a, a[:2]], [s, s[:2]], (64, 64))


def test_video_round_trip(tmp_path):
    frames = np.zeros((5, 48, 64, 3), np.uint8)
    for t in range(5):
        frames[t, 8:24, 8 + 4 * t:24 + 4 * t] = (255, 255, 255)
    path = write_video(frames, tmp_path / "v.mp4", fps=8)
    back = read_video(path)
    assert back.shape == (5, 48, 64, 3)
    assert np.abs(back.astype(int) - frames).mean() < 8
    with pytest.raises(InputError, match="already exists"):
        write_video(frames, path, fps=8)
    write_video(iter(frames[:3]), path, fps=8, overwrite=True)
    assert read_video(path).shape[0] == 3
    with pytest.raises(InputError, match="parent folder"):
        write_video(frames, tmp_path / "no" / "v.mp4", fps=8)
    odd = write_video(np.zeros((2, 27, 41, 3), np.uint8), tmp_path / "odd.mp4", fps=8)
    assert read_video(odd).shape == (2, 28, 42, 3)  # padded to even sizes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.mp4", "v.mp4"]


def test_interrupted_writer_leaves_nothing(tmp_path):
    path = tmp_path / "v.mp4"
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(path, fps=8) as writer:
            writer.append(np.zeros((16, 16, 3), np.uint8))
            raise KeyboardInterrupt
    with pytest.raises(InputError, match="frame 1"):
        write_video([np.zeros((16, 16, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)], path, 8)
    with pytest.raises(InputError, match="no frames"):
        write_video([], path, 8)
    assert list(tmp_path.iterdir()) == []


def test_a_whole_mp4_has_whole_top_level_boxes_and_its_index(tmp_path):
    import struct

    from engine.video import mp4_is_whole

    def box(kind, body=b"", size=None):
        return struct.pack(">I4s", 8 + len(body) if size is None else size, kind) + body

    wide = struct.pack(">I4sQ", 1, b"mdat", 16 + 4) + b"abcd"  # a 64-bit size
    cases = {b"": False, box(b"ftyp", b"isom") + wide + box(b"moov", b"x" * 8): True,
             box(b"ftyp", b"isom") + box(b"mdat", b"abcd"): False,  # no index: ffmpeg stopped before its trailer
             box(b"ftyp", b"isom") + box(b"mdat", b"abcd", size=0): False,  # the size ffmpeg fills in at the end
             box(b"ftyp", b"isom") + box(b"moov", b"x" * 8)[:-3]: False,  # cut inside a box
             box(b"ftyp", b"isom") + box(b"moov", b"x" * 8, size=0): False}
    for i, (data, whole) in enumerate(cases.items()):
        path = tmp_path / f"{i}.mp4"
        path.write_bytes(data)
        assert mp4_is_whole(path) is whole, (i, data)
    assert mp4_is_whole(write_video(np.zeros((3, 16, 16, 3), np.uint8), tmp_path / "real.mp4", fps=8))


def test_a_video_ffmpeg_could_not_finish_is_an_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    """On a full disk ffmpeg cannot write the video's index; imageio-ffmpeg does not report its exit
    status, so the broken file was renamed over the old one and the run said it wrote it."""
    import imageio.v2 as iio

    real = iio.get_writer

    class Truncated:  # what a full disk leaves: ffmpeg wrote the frames but not the index
        def __init__(self, path, **kw):
            self.path, self.inner = path, real(path, **kw)

        def append_data(self, frame):
            self.inner.append_data(frame)

        def close(self):
            self.inner.close()
            with open(self.path, "r+b") as f:
                f.truncate(f.seek(0, 2) // 2)

    path = tmp_path / "v.mp4"
    path.write_bytes(b"old video")
    monkeypatch.setattr(iio, "get_writer", Truncated)
    with pytest.raises(OSError, match="ffmpeg could not finish the video") as e:
        write_video(np.zeros((3, 16, 16, 3), np.uint8), path, fps=8, overwrite=True)
    assert e.value.filename == str(path)
    assert path.read_bytes() == b"old video" and [p.name for p in tmp_path.iterdir()] == ["v.mp4"]
    monkeypatch.setattr(iio, "get_writer", real)
    assert read_video(write_video(np.zeros((3, 16, 16, 3), np.uint8), path, fps=8, overwrite=True)).shape[0] == 3

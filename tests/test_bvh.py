import functools
import math

import numpy as np
import pytest

from finephys.poses.bvh import CMU_SCALE, bvh_to_h36m, forward_kinematics, load_motion, read_bvh
from finephys.errors import InputError


@functools.lru_cache(maxsize=1)
def _parsed(path):
    return read_bvh(path)


@pytest.fixture
def cmu(motion):
    return _parsed(motion / "131_01.bvh")


@pytest.fixture
def text(motion):
    return (motion / "131_01.bvh").read_text()


def rot(axis, deg):
    """Hand-written rotation matrix, independent of finephys.poses.bvh."""
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return {"X": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "Y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "Z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


def test_parse_cmu(cmu):
    assert cmu.num_frames == 994 and cmu.num_joints == 31
    assert abs(cmu.frame_time - 1 / 120) < 1e-6
    assert cmu.motion.shape == (994, 96)
    assert cmu.names[0] == "Hips" and cmu.parents[0] == -1
    assert cmu.parents[cmu.names.index("LeftHip")] == cmu.names.index("LHipJoint")
    assert cmu.channels[0] == ("Xposition", "Yposition", "Zposition",
                               "Zrotation", "Yrotation", "Xrotation")
    assert cmu.channels[cmu.names.index("LeftShoulder")] == ("Zrotation", "Xrotation", "Yrotation")
    assert len(cmu.end_parents) == 7 and "Head_end" in cmu.end_names


def test_fk_root_and_bone_lengths(cmu):
    pos = forward_kinematics(cmu, scale=CMU_SCALE)
    assert pos.shape == (994, 31, 3)
    np.testing.assert_allclose(pos[0, 0], cmu.motion[0, :3] * CMU_SCALE)
    bones = np.linalg.norm(pos[:, 1:] - pos[:, cmu.parents[1:]], axis=-1)
    np.testing.assert_allclose(bones, bones[:1].repeat(994, 0), atol=1e-9)
    np.testing.assert_allclose(bones[0], np.linalg.norm(cmu.offsets[1:], axis=1) * CMU_SCALE)


def test_fk_by_hand(cmu, text):
    # LeftHip = root_pos + R_root (off_LHipJoint + R_LHipJoint off_LeftHip), from frame 0's text
    lines = text.splitlines()
    values = [float(v) for v in lines[lines.index("MOTION") + 3].split()]
    root_pos = np.array(values[0:3])
    r_root = rot("Z", values[3]) @ rot("Y", values[4]) @ rot("X", values[5])
    r_hipjoint = rot("Z", values[6]) @ rot("Y", values[7]) @ rot("X", values[8])
    off_hipjoint = np.zeros(3)
    off_lefthip = np.array([1.24777, -1.64261, 0.71711])
    want = root_pos + r_root @ (off_hipjoint + r_hipjoint @ off_lefthip)
    got = forward_kinematics(cmu)[0, cmu.names.index("LeftHip")]
    np.testing.assert_allclose(got, want, atol=1e-9)


SMALL = """HIERARCHY
ROOT a
{
  OFFSET 1 0 0
  CHANNELS 6 Xrotation Zposition Zrotation Xposition Yrotation Yposition
  JOINT b
  {
    OFFSET 0 2 0
    CHANNELS 3 Yrotation Xrotation Zrotation
    End Site
    {
      OFFSET 0 0 3
    }
  }
}
MOTION
Frames: 2
Frame Time: 0.5
10 1 20 2 30 3 40 50 60
0 0 0 0 0 0 0 0 0
"""


def test_any_channel_order(tmp_path):
    path = tmp_path / "small.bvh"
    path.write_text(SMALL)
    bvh = read_bvh(path)
    assert bvh.fps == 2.0 and bvh.names == ("a", "b")
    pos = forward_kinematics(bvh, end_sites=True)
    r_a = rot("X", 10) @ rot("Z", 20) @ rot("Y", 30)
    r_b = rot("Y", 40) @ rot("X", 50) @ rot("Z", 60)
    p_a = np.array([1 + 2, 3, 1])  # offset + (X, Y, Z) position channels
    p_b = p_a + r_a @ np.array([0, 2, 0])
    p_end = p_b + r_a @ r_b @ np.array([0, 0, 3])
    np.testing.assert_allclose(pos[0], [p_a, p_b, p_end], atol=1e-9)
    np.testing.assert_allclose(pos[1], [[1, 0, 0], [1, 2, 0], [1, 2, 3]], atol=1e-12)


def test_h36m_mapping(cmu):
    h = bvh_to_h36m(cmu)
    pos = forward_kinematics(cmu, CMU_SCALE)
    assert h.shape == (994, 17, 3)
    for h_index, name in [(0, "Hips"), (4, "LeftHip"), (1, "RightHip"), (13, "LeftWrist"),
                          (16, "RightWrist"), (6, "LeftAnkle"), (8, "Neck")]:
        np.testing.assert_allclose(h[:, h_index], pos[:, cmu.names.index(name)])
    f0 = h[0]
    assert 0.85 < f0[0, 1] < 1.05  # pelvis height in metres
    assert f0[10, 1] > f0[9, 1] > f0[8, 1] > f0[7, 1] > f0[0, 1] > f0[2, 1] > f0[3, 1]
    femur = np.linalg.norm(h[:, 5] - h[:, 4], axis=-1)
    assert np.allclose(femur, 0.41, atol=0.02)
    # subject's left is +X in the rest pose: offsets of LeftHip / RightHip
    assert cmu.offsets[cmu.names.index("LeftHip"), 0] > 0 > cmu.offsets[cmu.names.index("RightHip"), 0]


def test_load_motion(motion, tmp_path):
    joints = load_motion(motion / "131_01.bvh", 8)
    assert joints.shape == (67, 17, 3) and joints.dtype == np.float32
    full = bvh_to_h36m(_parsed(motion / "131_01.bvh"))
    np.testing.assert_allclose(joints[0], full[0], atol=1e-6)
    np.testing.assert_allclose(joints[3], full[45], atol=1e-4)  # 3 / 8 s = frame 45 at 120 fps
    ramp = np.zeros((31, 17, 3))
    ramp[..., 0] = np.arange(31)[:, None]
    np.savez(tmp_path / "m.npz", joints3d=ramp, fps=np.array(30.0))
    half = load_motion(tmp_path / "m.npz", 15)
    assert half.shape == (16, 17, 3)
    np.testing.assert_allclose(half[:, 0, 0], np.arange(0, 31, 2))
    np.savez(tmp_path / "bad.npz", joints3d=np.zeros((5, 16, 3)), fps=np.array(30.0))
    with pytest.raises(InputError, match="'joints3d' has shape"):
        load_motion(tmp_path / "bad.npz", 15)
    with pytest.raises(InputError, match="unsupported"):
        load_motion(tmp_path / "m.txt", 15)


def _broken(tmp_path, text):
    path = tmp_path / "broken.bvh"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        read_bvh(path)
    assert "\n" not in str(info.value) and "broken.bvh" in str(info.value)
    return str(info.value)


def test_truncated_and_malformed(tmp_path, text):
    lines = text.splitlines()
    first = lines.index("MOTION") + 3  # 0-based index of the first frame line
    assert "truncated" in _broken(tmp_path, text[: len(text) // 2])
    assert "MOTION" in _broken(tmp_path, "\n".join(lines[:100]))
    assert "ends inside the HIERARCHY" in _broken(
        tmp_path, "\n".join(lines[:100] + lines[lines.index("MOTION"):]))
    bad = list(lines)
    bad[first + 10] = " ".join(bad[first + 10].split()[:-1])
    assert f":{first + 11}: frame 10 has 95 values, expected 96" in _broken(tmp_path, "\n".join(bad))
    bad = list(lines)
    bad[first + 5] = bad[first + 5].replace(bad[first + 5].split()[4], "nan", 1)
    assert f":{first + 6}: frame 5 holds NaN" in _broken(tmp_path, "\n".join(bad))
    bad = list(lines)
    bad[first - 2] = "Frames: 995"
    assert "expected 995" in _broken(tmp_path, "\n".join(bad))
    assert "unknown channel 'Wrotation'" in _broken(tmp_path, SMALL.replace("Yrotation X", "Wrotation X"))
    assert "second OFFSET" in _broken(tmp_path, SMALL.replace("OFFSET 0 2 0", "OFFSET 0 2 0 OFFSET 0 1 0"))
    with pytest.raises(InputError, match="file not found"):
        read_bvh(tmp_path / "none.bvh")


def test_shoulders_are_the_arm_joints_in_both_cmu_releases(motion):
    """The 3dsMax release (131_01) names the arm joint LeftShoulder; the MotionBuilder release
    (cmu/) names the clavicle so and the arm joint LeftArm. Either way the H36M shoulders (11, 14)
    must lie a human shoulder width apart (clavicles at the thorax would be a few cm apart), and
    the MotionBuilder files lose their converter T-pose frame 0."""
    for path in (motion / "131_01.bvh", motion / "cmu" / "07_01.bvh", motion / "cmu" / "05_06.bvh"):
        bvh = _parsed(path)
        joints = bvh_to_h36m(bvh)
        width = np.linalg.norm(joints[:, 11] - joints[:, 14], axis=-1)
        assert 0.30 < np.median(width) < 0.45, (path.name, np.median(width))
        upper_arm = np.linalg.norm(joints[:, 12] - joints[:, 11], axis=-1)
        assert 0.22 < np.median(upper_arm) < 0.35, (path.name, np.median(upper_arm))
        motionbuilder = path.parent.name == "cmu"
        assert len(joints) == bvh.num_frames - motionbuilder

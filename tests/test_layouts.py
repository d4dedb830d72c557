import numpy as np
import pytest

from finephys.errors import InputError
from finephys.poses.layouts import (COCO17, H36M17, H36M_EDGES, LAYOUTS, OPENPOSE18, convert_keypoints,
                              get_layout, num_joints)


def coco_pose():
    """An asymmetric COCO pose: left wrist raised, left hip lower than the right, distinct x."""
    kp = np.zeros((17, 2), np.float32)
    kp[:, 0] = np.arange(17) * 10.0  # every joint has its own x
    kp[:, 1] = 100.0
    kp[9, 1] = 10.0  # left wrist up
    kp[11, 1] = 160.0  # left hip
    kp[12, 1] = 140.0  # right hip
    kp[5, 1], kp[6, 1] = 60.0, 64.0  # shoulders
    sc = np.linspace(0.5, 1.0, 17).astype(np.float32)
    return kp, sc


def test_layout_tables():
    assert num_joints("coco17") == 17 and num_joints("h36m17") == 17
    assert num_joints("openpose18") == 18
    assert set(LAYOUTS) == {"coco17", "h36m17", "openpose18"}
    assert H36M_EDGES == H36M17.edges and len(H36M_EDGES) == 16
    for lay in LAYOUTS.values():
        flip = np.array(lay.flip)
        assert sorted(flip) == list(range(lay.num_joints))
        assert (flip[flip] == np.arange(lay.num_joints)).all()
        for a, b in lay.edges:
            assert 0 <= a < lay.num_joints and 0 <= b < lay.num_joints
    assert H36M17.flip[13] == 16 and H36M17.flip[1] == 4 and H36M17.flip[0] == 0
    assert COCO17.flip[9] == 10 and OPENPOSE18.flip[1] == 1 and OPENPOSE18.flip[14] == 15


def test_unknown_layout_lists_known():
    with pytest.raises(InputError, match="coco17.*h36m17.*openpose18"):
        num_joints("smpl24")


def test_coco_to_h36m_asymmetric():
    kp, sc = coco_pose()
    out, osc = convert_keypoints(kp, sc, "coco17", "h36m17")
    assert out.shape == (17, 2) and osc.shape == (17,)
    # the raised left wrist lands on H36M l_wrist (13), not r_wrist (16)
    assert out[13, 1] == 10.0 and out[16, 1] == 100.0
    assert H36M17.joints[13] == "l_wrist"
    # left hip lower (larger y) than the right one
    assert out[4, 1] == 160.0 and out[1, 1] == 140.0
    np.testing.assert_allclose(out[[1, 2, 3]], kp[[12, 14, 16]])
    np.testing.assert_allclose(out[[4, 5, 6]], kp[[11, 13, 15]])
    np.testing.assert_allclose(out[[11, 12, 13]], kp[[5, 7, 9]])
    np.testing.assert_allclose(out[[14, 15, 16]], kp[[6, 8, 10]])
    # derived joints: coordinates from the sources, score = min of the sources
    pelvis, thorax = (kp[11] + kp[12]) / 2, (kp[5] + kp[6]) / 2
    np.testing.assert_allclose(out[0], pelvis)
    np.testing.assert_allclose(out[8], thorax)
    np.testing.assert_allclose(out[7], (pelvis + thorax) / 2)
    np.testing.assert_allclose(out[10], (kp[1] + kp[2]) / 2)
    np.testing.assert_allclose(out[9], kp[0])
    assert osc[0] == min(sc[11], sc[12]) and osc[8] == min(sc[5], sc[6])
    assert osc[7] == sc[[5, 6, 11, 12]].min() and osc[10] == min(sc[1], sc[2])
    assert osc[13] == sc[9]


def test_zero_score_source_gives_zero_derived_joint():
    kp, sc = coco_pose()
    kp[12] = np.nan  # missing right hip with garbage coordinates
    sc[12] = 0.0
    out, osc = convert_keypoints(kp, sc, "coco17", "h36m17")
    assert osc[0] == 0 and osc[7] == 0 and osc[1] == 0
    assert np.isfinite(out).all() and (out[[0, 1, 7]] == 0).all()
    assert osc[4] == sc[11]


def test_batched_3d_and_identity():
    kp, sc = coco_pose()
    kp3 = np.concatenate([kp, np.arange(17, dtype=np.float32)[:, None]], axis=1)
    batch = np.stack([kp3, kp3 + 1])[None]  # (1, 2, 17, 3)
    sb = np.stack([sc, sc])[None]
    out, osc = convert_keypoints(batch, sb, "coco17", "h36m17")
    assert out.shape == (1, 2, 17, 3) and osc.shape == (1, 2, 17)
    assert out[0, 1, 13, 2] == 9 + 1 and out[0, 0, 0, 2] == 11.5
    same, ssc = convert_keypoints(out, osc, "h36m17", "h36m17")
    np.testing.assert_array_equal(same, out)
    np.testing.assert_array_equal(ssc, osc)


def test_openpose_to_h36m_and_coco_roundtrip():
    kp, sc = coco_pose()
    op, osc = convert_keypoints(kp, sc, "coco17", "openpose18")
    assert op.shape == (18, 2)
    np.testing.assert_allclose(op[1], (kp[5] + kp[6]) / 2)  # neck = mid-shoulders
    assert osc[1] == min(sc[5], sc[6])
    assert op[7, 1] == 10.0 and OPENPOSE18.joints[7] == "l_wrist"
    back, bsc = convert_keypoints(op, osc, "openpose18", "coco17")
    np.testing.assert_allclose(back, kp)
    np.testing.assert_allclose(bsc, sc)
    h_op, hsc_op = convert_keypoints(op, osc, "openpose18", "h36m17")
    h_co, hsc_co = convert_keypoints(kp, sc, "coco17", "h36m17")
    np.testing.assert_allclose(h_op, h_co)
    np.testing.assert_allclose(hsc_op, hsc_co)


def test_impossible_conversions_and_bad_shapes():
    kp = np.zeros((17, 2))
    sc = np.ones(17)
    with pytest.raises(InputError, match="h36m17 to coco17"):
        convert_keypoints(kp, sc, "h36m17", "coco17")
    with pytest.raises(InputError, match="h36m17 to openpose18"):
        convert_keypoints(kp, sc, "h36m17", "openpose18")
    with pytest.raises(InputError, match=r"expected \(\.\.\., 18, C\)"):
        convert_keypoints(kp, sc, "openpose18", "h36m17")
    with pytest.raises(InputError, match="scores have shape"):
        convert_keypoints(kp, np.ones(16), "coco17", "h36m17")
    with pytest.raises(InputError, match="unknown joint layout"):
        get_layout("coco18")

import pytest
import torch

from finephys.poses.camera import (
    fit_and_project, fit_pinhole_translation, fit_weak_perspective, project_pinhole, project_weak_perspective,
)


def _skeleton(b=2, t=5, j=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, j, 3, generator=g) * 0.3


def test_weak_perspective_round_trip_with_missing_joints():
    s = _skeleton()
    scale = torch.tensor([310.0, 170.0])
    offset = torch.rand(2, 5, 2, generator=torch.Generator().manual_seed(1)) * 200
    kp = project_weak_perspective(s, scale, offset)
    w = torch.rand(2, 5, 17, generator=torch.Generator().manual_seed(2))
    w[:, :, :5] = 0
    kp_noisy = kp.clone()
    kp_noisy[:, :, :5] += 1000  # missing joints' coordinates must not matter
    fs, fo = fit_weak_perspective(s, kp_noisy, w)
    torch.testing.assert_close(fs, scale, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(fo, offset, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(fit_and_project(s, kp_noisy, w)[:, :, 5:], kp[:, :, 5:], rtol=1e-4, atol=1e-2)


def test_frames_without_joints_take_the_nearest_frame():
    s = _skeleton(b=1, t=4)
    kp = project_weak_perspective(s, torch.tensor([200.0]), torch.tensor([[[10.0, 10], [20, 20], [30, 30], [40, 40]]]))
    w = torch.ones(1, 4, 17)
    w[0, 3] = 0
    _, off = fit_weak_perspective(s, kp, w)
    torch.testing.assert_close(off[0, 3], off[0, 2])


@pytest.mark.parametrize("dist", [
    [-0.2, 0.05, 0.001, -0.002],
    [-0.2, 0.05, 0.001, -0.002, 0.01],
    [-0.2, 0.05, 0.001, -0.002, 0.01, 0.02, -0.01, 0.003],
])
def test_pinhole_with_distortion_round_trip(dist):
    s = _skeleton()
    K = torch.tensor([[900.0, 0, 640], [0, 880, 360], [0, 0, 1]])
    dist = torch.tensor(dist)
    trans = torch.tensor([0.3, -0.1, 4.0]) + torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(3)) * 0.2
    kp = project_pinhole(s, trans, K, dist)
    w = torch.ones(2, 5, 17)
    torch.testing.assert_close(fit_pinhole_translation(s, kp, w, K, dist), trans, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fit_and_project(s, kp, w, K, dist), kp, rtol=1e-4, atol=1e-2)


def test_pinhole_projection_matches_a_hand_derived_case():
    """One point worked out by hand with OpenCV's model (k1, k2, p1, p2): (0.4, -0.2, 2) m ->
    x, y = 0.2, -0.1; r^2 = 0.05; radial = 1 - 0.2 * 0.05 + 0.05 * 0.05^2 = 0.990125;
    x' = 0.2 * radial + 2 * 0.001 * 0.2 * -0.1 - 0.002 * (0.05 + 2 * 0.04) = 0.197725;
    y' = -0.1 * radial + 0.001 * (0.05 + 2 * 0.01) + 2 * -0.002 * 0.2 * -0.1 = -0.0988625;
    u = 900 x' + 640 = 817.9525, v = 880 y' + 360 = 273.001."""
    K = torch.tensor([[900.0, 0, 640], [0, 880, 360], [0, 0, 1]], dtype=torch.float64)
    point = torch.tensor([0.4, -0.2, 2.0], dtype=torch.float64).view(1, 1, 1, 3)
    uv = project_pinhole(point, torch.zeros(1, 1, 3, dtype=torch.float64), K,
                         torch.tensor([-0.2, 0.05, 0.001, -0.002], dtype=torch.float64))
    torch.testing.assert_close(uv.flatten().double(), torch.tensor([817.9525, 273.001], dtype=torch.float64),
                               rtol=0, atol=1e-3)
    # without distortion: the plain pinhole, u = 900 * 0.2 + 640, v = 880 * -0.1 + 360
    uv = project_pinhole(point, torch.zeros(1, 1, 3, dtype=torch.float64), K)
    torch.testing.assert_close(uv.flatten().double(), torch.tensor([820.0, 272.0], dtype=torch.float64),
                               rtol=0, atol=1e-3)


def test_virtual_camera_sees_the_person_straight_on():
    """A person at the edge of a wide shot: the virtual camera's 2D is the projection (focal 1)
    of the camera-axes 3D turned by Q^T, the clip's mean root lands at its centre, Q is a
    rotation taking the optical axis to that root ray, and ``to_camera_axes`` turns back."""
    from finephys.poses.camera import to_camera_axes, virtual_camera

    g = torch.Generator().manual_seed(0)
    cam = torch.randn(1, 6, 17, 3, generator=g) * 0.3 + torch.tensor([-2.5, -0.8, 4.0])  # left of the axis
    K = torch.tensor([[700.0, 0, 960], [0, 700.0, 540], [0, 0, 1]])
    kp = (cam[..., :2] / cam[..., 2:]) * 700 + torch.tensor([960.0, 540.0])
    sc = torch.ones(kp.shape[:-1])
    sc[0, 2, 5] = 0
    view, turn = virtual_camera(kp, sc, K)
    turned = torch.einsum("bji,btkj->btki", turn, cam)  # Q^T X, written out
    expect = turned[..., :2] / turned[..., 2:]
    torch.testing.assert_close(view[sc > 0], expect[sc > 0], atol=1e-5, rtol=1e-5)
    assert float(view[0, 2, 5].abs().sum()) == 0
    assert float(view[0, :, 0].mean(0).abs().max()) < 5e-3  # near the centre (exactly: the mean ray, below)
    torch.testing.assert_close(turn[0] @ turn[0].T, torch.eye(3), atol=1e-6, rtol=0)
    ray = torch.cat([(kp[0, :, 0] - torch.tensor([960.0, 540.0])) / 700, torch.ones(6, 1)], -1).mean(0)
    assert float(torch.dot(turn[0][:, 2], ray / ray.norm())) > 1 - 1e-6
    torch.testing.assert_close(to_camera_axes(turned, turn), cam, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_camera", [True, False])
def test_pose_stack_keeps_every_tensor_on_the_clips_device(with_camera):
    """The GPU path (model and clip on cuda, K and dist as the clip file gives them, on the CPU)
    must make no tensor of its own on the CPU: on the meta device any such mix raises."""
    from types import SimpleNamespace

    from finephys.model.demo import load_demo_pose_parts
    from finephys.sampler.poses import pose_stack

    _, lifter, physnet = load_demo_pose_parts()
    parts = SimpleNamespace(lifter=lifter.to("meta"), physnet=physnet.to("meta"))
    kp, sc = torch.rand(1, 16, 17, 2, device="meta"), torch.ones(1, 16, 17, device="meta")
    K = torch.tensor([[1000.0, 0, 960], [0, 1000, 540], [0, 0, 1]]) if with_camera else None
    dist = torch.tensor([0.01, 0.0, 0.0, 0.0, 0.0]) if with_camera else None
    out = pose_stack(parts, kp, sc, 30.0, 0.5, False, K, dist)
    assert [o.device.type for o in out] == ["meta"] * 4
    assert [tuple(o.shape) for o in out] == [(1, 16, 17, 3)] * 3 + [(1, 16, 17, 2)]

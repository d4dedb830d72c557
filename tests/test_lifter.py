import torch

from finephys.model.config import LifterConfig
from finephys.model.lifter import Lifter, lift_windows, normalise_2d


def test_long_clips_are_lifted_in_windows_of_the_trained_length():
    torch.manual_seed(0)
    lifter = Lifter(LifterConfig(dim=16, depth=1, heads=2, max_frames=8)).eval()
    kp, sc = torch.rand(1, 20, 17, 2) * 200, torch.rand(1, 20, 17) * 0.9 + 0.1
    q = normalise_2d(kp, sc)
    with torch.no_grad():
        short = lift_windows(lifter, q[:, :8], sc[:, :8])
        torch.testing.assert_close(short, lifter(q[:, :8], sc[:, :8]))
        out = lift_windows(lifter, q, sc)  # windows start at 0, 5, 10, 12 (stride 5)
        assert out.shape == (1, 20, 17, 3)
        # frames seen by one window only are that window's output exactly
        torch.testing.assert_close(out[:, :5], lifter(q[:, :8], sc[:, :8])[:, :5])
        torch.testing.assert_close(out[:, 18:], lifter(q[:, 12:], sc[:, 12:])[:, 6:])
        # in an overlap the result lies between the windows' outputs (a convex blend)
        a, b = lifter(q[:, :8], sc[:, :8])[:, 6], lifter(q[:, 5:13], sc[:, 5:13])[:, 1]
        lo, hi = torch.minimum(a, b), torch.maximum(a, b)
        assert bool(((out[:, 6] >= lo - 1e-6) & (out[:, 6] <= hi + 1e-6)).all())


def test_normalised_2d_is_the_same_for_any_framing():
    """The lifter's input does not depend on where the person is or how big: shifting and
    scaling the pixels (a longer lens, a bigger image) gives the same normalised 2D, with
    missing joints too; its unit is about a metre at the person's depth."""
    from tests.conftest import made_walk

    world = torch.as_tensor(made_walk(16), dtype=torch.float32)
    kp = world[None, ..., :2] * torch.tensor([1.0, -1.0]) * 300 + 500  # 300 px per metre
    sc = torch.ones(kp.shape[:-1])
    sc[0, 3:6, 13] = 0  # a wrist lost for three frames
    ref = normalise_2d(kp, sc)
    moved = normalise_2d(kp * 2.5 + torch.tensor([-900.0, 40.0]), sc)
    torch.testing.assert_close(moved, ref)
    assert bool((ref[0, 3:6, 13] == 0).all())
    from finephys.model.lifter import body_scale

    full = float(body_scale(kp, sc))
    assert abs(full / 300 - 1) < 0.2  # this made-up body is not quite of typical proportions
    legs = sc.clone()
    legs[..., 1:7] = 0  # the legs out of view: the scale holds
    assert abs(float(body_scale(kp, legs)) / full - 1) < 0.1

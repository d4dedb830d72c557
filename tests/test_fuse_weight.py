"""The fusion weight of S_fused = w S_dd + (1 - w) S_pp: one number or one per joint, fitted by
train-pose, carried by the pose weights file and every config."""
from types import SimpleNamespace

import pytest
import torch

from finephys.model.config import FinePhysConfig, PoseConfig
from finephys.model.demo import demo_config, load_demo_pose_parts
from finephys.model.physnet import keep_bone_lengths
from finephys.poses.layouts import H36M17
from finephys.sampler.poses import lift_and_fuse
from finephys.training.train_pose import best_blend


def test_config_takes_one_weight_or_one_per_joint():
    assert PoseConfig(fuse_weight=[0.25] * 17).fuse_weight == (0.25,) * 17  # JSON's list -> tuple
    with pytest.raises(ValueError, match="one per joint"):
        PoseConfig(fuse_weight=[0.5] * 16)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        PoseConfig(fuse_weight=[0.5] * 16 + [1.5])
    cfg = FinePhysConfig(pose=PoseConfig(fuse_weight=tuple(i / 16 for i in range(17))))
    assert FinePhysConfig.from_dict(cfg.to_dict()) == cfg  # a checkpoint's config round trip


def _stack(fuse_weight):
    _, lifter, physnet = load_demo_pose_parts()
    gen = torch.Generator().manual_seed(0)
    kp = 400 + 200 * torch.rand(1, 12, 17, 2, generator=gen)
    sc = torch.ones(1, 12, 17)
    return lift_and_fuse(SimpleNamespace(lifter=lifter, physnet=physnet), kp, sc, None, 8.0, fuse_weight)


def test_per_joint_weights_blend_each_joint():
    s_dd, s_pp, fused_half = _stack(0.5)
    assert torch.allclose(_stack((0.5,) * 17)[2], fused_half, atol=1e-6)  # the same as one weight
    w = torch.linspace(0, 1, 17)
    want = keep_bone_lengths(w[:, None] * s_dd + (1 - w[:, None]) * s_pp, H36M17.edges)
    got = _stack(tuple(w.tolist()))[2]
    assert torch.allclose(got, want, atol=1e-6)
    assert (got - fused_half).abs().amax() > 1e-3  # and they do change the result


def test_best_blend_recovers_known_weights_and_clips():
    gen = torch.Generator().manual_seed(1)
    s_dd, s_pp = torch.randn(2, 8, 17, 3, generator=gen), torch.randn(2, 8, 17, 3, generator=gen)
    w = torch.linspace(-0.5, 1.5, 17)
    truth = w[:, None] * s_dd + (1 - w[:, None]) * s_pp
    half = len(s_dd) // 2  # two batches give the sums of one
    got = best_blend([(s_dd[:half], s_pp[:half], truth[:half]), (s_dd[half:], s_pp[half:], truth[half:])])
    assert got == pytest.approx(w.clamp(0, 1).tolist(), abs=1e-4)
    s_pp[..., 0, :] = s_dd[..., 0, :]  # the root: nothing to choose between
    assert best_blend([(s_dd, s_pp, truth)])[0] == 0.5


def test_demo_config_takes_the_shipped_weights_file_fusion():
    from finephys.model.pose_weights import DEMO_WEIGHTS, read_pose_config

    assert demo_config().pose == read_pose_config(DEMO_WEIGHTS)

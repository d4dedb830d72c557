import numpy as np
import pytest
import torch

from finephys.model.config import PhysNetConfig
from finephys.model.physnet import PhysNet, integrate, tril_size, tril_to_full


def numpy_step3(s_dd, minv_tril, jtau, coriolis, dt, w):
    """DESIGN.md step 3 and 4 transcribed literally, with loops."""
    b, t, j, _ = s_dd.shape
    d = 3 * j
    q = s_dd.reshape(b, t, d).astype(np.float64)
    s_pp = np.zeros_like(q)
    qdd = np.zeros((b, t, 2, d))
    for bi in range(b):
        for ti in range(t):
            for di in range(2):
                m = np.zeros((d, d))
                idx = 0
                for r in range(d):
                    for c in range(r + 1):
                        m[r, c] = m[c, r] = minv_tril[bi, ti, di, idx]
                        idx += 1
                qdd[bi, ti, di] = m @ (jtau[bi, ti, di] - coriolis[bi, ti, di])
        for ti in range(t):
            preds = []
            if ti >= 2:  # forward prediction made at frame ti-1
                preds.append(2 * q[bi, ti - 1] - q[bi, ti - 2] + qdd[bi, ti - 1, 0] * dt**2)
            if ti <= t - 3:  # reverse prediction made at frame ti+1
                preds.append(2 * q[bi, ti + 1] - q[bi, ti + 2] + qdd[bi, ti + 1, 1] * dt**2)
            s_pp[bi, ti] = np.mean(preds, axis=0) if preds else q[bi, ti]
    fused = w * q + (1 - w) * s_pp
    return s_pp.reshape(b, t, j, 3), fused.reshape(b, t, j, 3), qdd


@pytest.mark.parametrize("t,j", [(3, 17), (4, 17), (9, 5)])
def test_integrate_matches_numpy_transcription(t, j):
    rng = np.random.default_rng(t * 100 + j)
    d = 3 * j
    s = rng.normal(size=(2, t, j, 3)).astype(np.float32)
    tril = rng.normal(size=(2, t, 2, tril_size(d))).astype(np.float32)
    jt = rng.normal(size=(2, t, 2, d)).astype(np.float32)
    co = rng.normal(size=(2, t, 2, d)).astype(np.float32)
    dt, w = 1 / 8, 0.3
    got = integrate(*(torch.from_numpy(a) for a in (s, tril, jt, co)), dt, w)
    want = numpy_step3(s, tril, jt, co, dt, w)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-4, atol=1e-4)
    if t == 3:  # the middle frame has neither prediction and keeps S_dd
        np.testing.assert_allclose(got[0][:, 1].numpy(), s[:, 1], rtol=0, atol=0)


def test_symmetric_assembly_row_major():
    d = 4
    tril = torch.arange(1, tril_size(d) + 1, dtype=torch.float32)
    m = tril_to_full(tril, d)
    assert torch.equal(m, m.T)
    # row-major lower triangle: (0,0)=1 (1,0)=2 (1,1)=3 (2,0)=4 (2,1)=5 (2,2)=6 (3,0)=7 ...
    assert m[1, 0] == 2 and m[0, 1] == 2 and m[2, 1] == 5 and m[3, 0] == 7 and m[3, 3] == 10


def test_too_short_and_bad_dt():
    net = PhysNet(PhysNetConfig(num_joints=3, hidden=8))
    with pytest.raises(ValueError, match="at least 3 frames"):
        net(torch.randn(1, 2, 3, 3), dt=0.1)
    with pytest.raises(ValueError, match="dt"):
        net(torch.randn(1, 4, 3, 3), dt=float("nan"))


def test_heads_read_direction_windows_and_noise_only_when_asked():
    torch.manual_seed(0)
    net = PhysNet(PhysNetConfig(num_joints=4, hidden=16))
    s = torch.randn(1, 6, 4, 3)
    minv, jtau, cor = net.predict(s)
    assert minv.shape == (1, 6, 2, tril_size(12)) and jtau.shape == cor.shape == (1, 6, 2, 12)
    assert torch.equal(net.predict(s)[0], minv)
    assert not torch.equal(net.predict(s, minv_noise=0.1)[0], minv)
    # the reverse head reads (q[t+1], q[t], q[t-1])
    rev = net.heads[1].body(torch.cat([s.reshape(1, 6, 12)[:, 3], s.reshape(1, 6, 12)[:, 2], s.reshape(1, 6, 12)[:, 1]], -1))
    torch.testing.assert_close(net.heads[1].jtau(rev), jtau[:, 2, 1])


def test_keep_bone_lengths_makes_bones_rigid():
    """Every bone takes its median length over the clip along its own direction, from the root
    out: a forearm stretched in one frame comes back to its usual length, the hand follows it,
    and a skeleton that is already rigid is unchanged."""
    from finephys.model.physnet import keep_bone_lengths
    from finephys.poses.layouts import H36M17
    from tests.conftest import made_walk

    rigid = torch.as_tensor(made_walk(9), dtype=torch.float64)[None]
    torch.testing.assert_close(keep_bone_lengths(rigid, H36M17.edges), rigid)
    s = rigid.clone()
    s[0, 4, 12] += (s[0, 4, 12] - s[0, 4, 11]) * 0.5  # l_elbow pushed out along the upper arm: it stretches
    s[0, 4, 13] += (s[0, 4, 12] - rigid[0, 4, 12])  # the wrist moved with it: the forearm keeps its length
    out = keep_bone_lengths(s, H36M17.edges)
    torch.testing.assert_close(out, rigid)
    edges = torch.tensor(H36M17.edges)
    lengths = (out[..., edges[:, 1], :] - out[..., edges[:, 0], :]).norm(dim=-1)
    assert float(lengths.std(dim=1).max()) < 1e-9

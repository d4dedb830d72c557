import math

import pytest
import torch

from finephys.model.config import EncoderConfig
from finephys.model.encoder import HeatmapEncoder
from fpkernels.heatmap import render_heatmaps_ref


def test_heatmap_peaks_at_joints_with_the_formula():
    kp = torch.tensor([[[[10.0, 20.0], [33.0, 5.0]]]])  # (1,1,2,2): (x, y)
    vis = torch.tensor([[[1.0, 0.5]]])
    h = render_heatmaps_ref(kp, vis, 24, 40, sigma=2.0)
    assert h.shape == (1, 1, 2, 24, 40)
    assert divmod(int(h[0, 0, 0].argmax()), 40) == (20, 10)  # row = y, col = x
    assert divmod(int(h[0, 0, 1].argmax()), 40) == (5, 33)
    assert h[0, 0, 1].max().item() == pytest.approx(0.5)
    assert h[0, 0, 0, 21, 12].item() == pytest.approx(math.exp(-(4 + 1) / 8.0), rel=1e-6)


def test_heatmap_bad_arguments():
    with pytest.raises(ValueError, match="sigma"):
        render_heatmaps_ref(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2), 8, 8, sigma=0.0)
    with pytest.raises(ValueError, match="visibility"):
        render_heatmaps_ref(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 3), 8, 8, sigma=1.0)


def test_encoder_features_match_unet_block_sizes():
    enc = HeatmapEncoder(EncoderConfig(num_joints=17, channels=(8, 16, 16, 16), num_res_blocks=1))
    feats = enc(torch.rand(3, 17, 72, 40))  # 72/8 = 9 -> 5 -> 3 -> 2 (ceil, as the UNet's convs)
    assert [tuple(f.shape) for f in feats] == [(3, 8, 9, 5), (3, 16, 5, 3), (3, 16, 3, 2), (3, 16, 2, 1)]

import torch

from finephys.demo import demo_config
from finephys.encoder import HeatmapEncoder
from finephys.model import build_unet
from finephys.unet import PoseGuidedUNet


def test_pose_guided_unet_equals_diffusers_without_features_and_uses_them():
    torch.manual_seed(0)
    cfg = demo_config()
    unet = build_unet(cfg).eval()
    wrapped = PoseGuidedUNet(unet)
    x = torch.randn(1, 4, 3, 8, 16)
    text = torch.randn(3, 77, cfg.unet["cross_attention_dim"])
    with torch.no_grad():
        ref = unet(x, torch.tensor(500), text).sample
        ours = wrapped(x, torch.tensor(500), text)
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
        feats = HeatmapEncoder(cfg.encoder)(torch.rand(3, 17, 64, 128))
        assert [f.shape[-2:] for f in feats] == [(8, 16), (4, 8), (2, 4), (1, 2)]
        zeros = [torch.zeros_like(f) for f in feats]
        torch.testing.assert_close(wrapped(x, torch.tensor(500), text, zeros), ref, rtol=0, atol=1e-6)
        for k in range(4):  # every stage's feature reaches the output
            one = [f if i == k else torch.zeros_like(f) for i, f in enumerate(feats)]
            assert (wrapped(x, torch.tensor(500), text, one) - ref).abs().max() > 1e-4

import torch

from finephys.model.demo import demo_config
from finephys.model.encoder import HeatmapEncoder
from finephys.model.build import build_unet
from finephys.model.unet import PoseGuidedUNet


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
        f = cfg.vae_scale_factor
        feats = HeatmapEncoder(cfg.encoder)(torch.rand(3, 17, 8 * f, 16 * f))  # x's latent size
        assert [f.shape[-2:] for f in feats] == [(8, 16), (4, 8), (2, 4), (1, 2)]
        zeros = [torch.zeros_like(f) for f in feats]
        torch.testing.assert_close(wrapped(x, torch.tensor(500), text, zeros), ref, rtol=0, atol=1e-6)
        for k in range(4):  # every stage's feature reaches the output
            one = [f if i == k else torch.zeros_like(f) for i, f in enumerate(feats)]
            assert (wrapped(x, torch.tensor(500), text, one) - ref).abs().max() > 1e-4


def test_deep_cache_calls_reproduce_the_full_step_and_track_the_shallow_inputs():
    """forward_and_cache gives forward's output; forward_shallow with the same inputs and the cached
    deep features gives it again (at every depth); with another timestep it changes."""
    torch.manual_seed(0)
    cfg = demo_config()
    unet = build_unet(cfg).eval()
    with torch.no_grad():
        for p in unet.parameters():  # diffusers zero-initialises some output projections
            p.add_(torch.randn_like(p) * 0.05)
    wrapped = PoseGuidedUNet(unet)
    x = torch.randn(2, 4, 3, 8, 16)
    text = torch.randn(6, 77, cfg.unet["cross_attention_dim"])
    f = cfg.vae_scale_factor
    feats = HeatmapEncoder(cfg.encoder)(torch.rand(6, 17, 8 * f, 16 * f))  # x's latent size
    t = torch.tensor(500)
    depths = list(wrapped.cache_depths())
    assert depths == [1, 2]  # the demo's last up block has layers_per_block + 1 = 2 pairs
    with torch.no_grad():
        want = wrapped(x, t, text, feats)
        for depth in depths:
            out, deep = wrapped.forward_and_cache(x, t, text, feats, depth)
            torch.testing.assert_close(out, want, rtol=0, atol=0)
            torch.testing.assert_close(wrapped.forward_shallow(x, t, text, feats, deep, depth), want,
                                       rtol=1e-5, atol=1e-5)
            moved = wrapped.forward_shallow(x, torch.tensor(100), text, feats, deep, depth)
            assert (moved - want).abs().max() > 1e-4

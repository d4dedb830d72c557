"""finephys.model.convert: SD 1.5 single files / folders, AnimateDiff motion modules, LoRA files.

The synthetic source files are written with the PUBLIC key layouts, produced here from the
source architectures (LDM ``openaimodel.UNetModel`` / ``Encoder`` / ``Decoder``, the original
AnimateDiff ``VanillaTemporalModule``, kohya / diffusers LoRA names) and never by inverting
the converters' maps. Spot checks pair literal source names with literal diffusers names, and the
UNet / VAE / motion-module maps are also compared with diffusers' own converters.
"""

import copy
import json
import math

import pytest
import torch
from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from finephys.model.convert import (
    SD15_TEXT_CONFIG,
    SD15_UNET_CONFIG,
    SD15_VAE_CONFIG,
    LoraWeights,
    load_lora,
    load_motion_module,
    load_sd15_diffusers_folder,
    load_sd15_single_file,
    read_weights,
)
from finephys.model.convert.sd15 import convert_sd15_ldm
from finephys.errors import InputError

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 32, 64], layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=[8, 16], layers_per_block=1, latent_channels=4,
    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4,
    sample_size=16,
)
TINY_TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=12, hidden_act="quick_gelu", projection_dim=16,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)


# ------------------------------------------------------------- LDM layouts (openaimodel / autoencoder)

def ldm_unet_shapes(mc, mult, layers, attn_levels, ctx, in_ch=4, out_ch=4):
    """Key -> shape of LDM's UNetModel (SD 1.x: num_heads 8, transformer depth 1, conv proj_in/out)."""
    s, temb = {}, 4 * mc

    def lin(p, o, i, bias=True):
        s[f"{p}.weight"] = (o, i)
        if bias:
            s[f"{p}.bias"] = (o,)

    def conv(p, o, i, k):
        s[f"{p}.weight"], s[f"{p}.bias"] = (o, i, k, k), (o,)

    def norm(p, c):
        s[f"{p}.weight"], s[f"{p}.bias"] = (c,), (c,)

    def res(p, cin, cout):
        norm(f"{p}.in_layers.0", cin)
        conv(f"{p}.in_layers.2", cout, cin, 3)
        lin(f"{p}.emb_layers.1", cout, temb)
        norm(f"{p}.out_layers.0", cout)
        conv(f"{p}.out_layers.3", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.skip_connection", cout, cin, 1)

    def spatial(p, c):
        norm(f"{p}.norm", c)
        conv(f"{p}.proj_in", c, c, 1)
        t = f"{p}.transformer_blocks.0"
        for a, kv in (("attn1", c), ("attn2", ctx)):
            lin(f"{t}.{a}.to_q", c, c, bias=False)
            lin(f"{t}.{a}.to_k", c, kv, bias=False)
            lin(f"{t}.{a}.to_v", c, kv, bias=False)
            lin(f"{t}.{a}.to_out.0", c, c)
        lin(f"{t}.ff.net.0.proj", 8 * c, c)
        lin(f"{t}.ff.net.2", c, 4 * c)
        for n in ("norm1", "norm2", "norm3"):
            norm(f"{t}.{n}", c)
        conv(f"{p}.proj_out", c, c, 1)

    lin("time_embed.0", temb, mc)
    lin("time_embed.2", temb, temb)
    conv("input_blocks.0.0", mc, in_ch, 3)
    chans, ch, idx = [mc], mc, 1
    for level, m in enumerate(mult):
        for _ in range(layers):
            res(f"input_blocks.{idx}.0", ch, mc * m)
            ch = mc * m
            if attn_levels[level]:
                spatial(f"input_blocks.{idx}.1", ch)
            chans.append(ch)
            idx += 1
        if level != len(mult) - 1:
            conv(f"input_blocks.{idx}.0.op", ch, ch, 3)
            chans.append(ch)
            idx += 1
    res("middle_block.0", ch, ch)
    spatial("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    idx = 0
    for level, m in list(enumerate(mult))[::-1]:
        for i in range(layers + 1):
            res(f"output_blocks.{idx}.0", ch + chans.pop(), mc * m)
            ch, j = mc * m, 1
            if attn_levels[level]:
                spatial(f"output_blocks.{idx}.1", ch)
                j = 2
            if level and i == layers:
                conv(f"output_blocks.{idx}.{j}.conv", ch, ch, 3)
            idx += 1
    norm("out.0", ch)
    conv("out.2", out_ch, ch, 3)
    return s


def ldm_vae_shapes(ch, ch_mult, num_res, z=4, in_ch=3, out_ch=3):
    """Key -> shape of LDM's AutoencoderKL (Encoder / Decoder of diffusionmodules/model.py)."""
    s = {}

    def conv(p, o, i, k):
        s[f"{p}.weight"], s[f"{p}.bias"] = (o, i, k, k), (o,)

    def norm(p, c):
        s[f"{p}.weight"], s[f"{p}.bias"] = (c,), (c,)

    def res(p, cin, cout):
        norm(f"{p}.norm1", cin)
        conv(f"{p}.conv1", cout, cin, 3)
        norm(f"{p}.norm2", cout)
        conv(f"{p}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.nin_shortcut", cout, cin, 1)

    def mid(p, c):
        res(f"{p}.mid.block_1", c, c)
        norm(f"{p}.mid.attn_1.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{p}.mid.attn_1.{n}", c, c, 1)
        res(f"{p}.mid.block_2", c, c)

    conv("encoder.conv_in", ch, in_ch, 3)
    block_in = ch
    for i, m in enumerate(ch_mult):
        for j in range(num_res):
            res(f"encoder.down.{i}.block.{j}", block_in, ch * m)
            block_in = ch * m
        if i != len(ch_mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    mid("encoder", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", 2 * z, block_in, 3)
    block_in = ch * ch_mult[-1]
    conv("decoder.conv_in", block_in, z, 3)
    mid("decoder", block_in)
    for i in reversed(range(len(ch_mult))):
        for j in range(num_res + 1):
            res(f"decoder.up.{i}.block.{j}", block_in, ch * ch_mult[i])
            block_in = ch * ch_mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", out_ch, block_in, 3)
    conv("quant_conv", 2 * z, 2 * z, 1)
    conv("post_quant_conv", z, z, 1)
    return s


def clip_shapes(h, layers, inter, vocab, pos):
    s = {"embeddings.token_embedding.weight": (vocab, h), "embeddings.position_embedding.weight": (pos, h),
         "final_layer_norm.weight": (h,), "final_layer_norm.bias": (h,)}
    for i in range(layers):
        p = f"encoder.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[f"{p}.self_attn.{n}.weight"], s[f"{p}.self_attn.{n}.bias"] = (h, h), (h,)
        s[f"{p}.mlp.fc1.weight"], s[f"{p}.mlp.fc1.bias"] = (inter, h), (inter,)
        s[f"{p}.mlp.fc2.weight"], s[f"{p}.mlp.fc2.bias"] = (h, inter), (h,)
        for n in ("layer_norm1", "layer_norm2"):
            s[f"{p}.{n}.weight"], s[f"{p}.{n}.bias"] = (h,), (h,)
    return s


def ldm_checkpoint(unet, vae, text, make, text_prefix="cond_stage_model.transformer.text_model."):
    sd = {f"model.diffusion_model.{k}": make(v) for k, v in unet.items()}
    sd.update({f"first_stage_model.{k}": make(v) for k, v in vae.items()})
    sd.update({f"{text_prefix}{k}": make(v) for k, v in text.items()})
    return sd


def tiny_ldm(seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    sd = ldm_checkpoint(ldm_unet_shapes(32, (1, 1, 2), 1, (True, True, False), 16),
                        ldm_vae_shapes(8, (1, 2), 1), clip_shapes(16, 2, 32, 64, 12),
                        lambda shape: torch.randn(shape, generator=g), **kw)
    return sd


def tiny_models():
    torch.manual_seed(0)
    return (UNet2DConditionModel(**TINY_UNET), AutoencoderKL(**TINY_VAE), CLIPTextModel(CLIPTextConfig(**TINY_TEXT)))


@pytest.fixture(scope="module")
def models():
    return tiny_models()


# -------------------------------------------------------------------------------------------- SD 1.5

def test_full_sd15_layout_converts_strictly():
    """The real SD 1.5 key set (1131 keys, as in v1-5-pruned-emaonly) maps onto the SD15_* configs."""
    unet = ldm_unet_shapes(320, (1, 2, 4, 4), 2, (True, True, True, False), 768)
    vae = ldm_vae_shapes(128, (1, 2, 4, 4), 2)
    text = clip_shapes(768, 12, 3072, 49408, 77)
    text["embeddings.position_ids"] = (1, 77)
    sd = ldm_checkpoint(unet, vae, text, lambda shape: torch.empty(shape, device="meta"))
    assert (len(unet), len(vae), len(text), len(sd)) == (686, 248, 197, 1131)
    public = [  # names as they appear in the public v1-5 checkpoint
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
        "model.diffusion_model.input_blocks.11.0.out_layers.3.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.8.2.conv.weight",
        "model.diffusion_model.output_blocks.11.1.proj_out.weight",
        "first_stage_model.encoder.mid.attn_1.proj_out.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ]
    assert set(public) <= set(sd)
    sd["alphas_cumprod"] = torch.empty(1000, device="meta")
    sd["model_ema.decay"] = torch.empty((), device="meta")
    out = convert_sd15_ldm(sd, SD15_UNET_CONFIG, SD15_VAE_CONFIG, SD15_TEXT_CONFIG)
    assert (len(out["unet"]), len(out["vae"]), len(out["text_encoder"])) == (686, 248, 196)
    pairs = {
        "model.diffusion_model.output_blocks.2.1.conv.weight": ("unet", "up_blocks.0.upsamplers.0.conv.weight"),
        "model.diffusion_model.output_blocks.5.2.conv.weight": ("unet", "up_blocks.1.upsamplers.0.conv.weight"),
        "model.diffusion_model.output_blocks.11.1.proj_out.weight": ("unet", "up_blocks.3.attentions.2.proj_out.weight"),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": ("unet", "down_blocks.1.resnets.0.conv_shortcut.weight"),
        "model.diffusion_model.input_blocks.3.0.op.weight": ("unet", "down_blocks.0.downsamplers.0.conv.weight"),
        "model.diffusion_model.middle_block.2.in_layers.2.weight": ("unet", "mid_block.resnets.1.conv1.weight"),
        "first_stage_model.decoder.up.3.upsample.conv.weight": ("vae", "decoder.up_blocks.0.upsamplers.0.conv.weight"),
        "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight": ("vae", "decoder.up_blocks.2.resnets.0.conv_shortcut.weight"),
    }
    for old, (part, new) in pairs.items():
        assert out[part][new] is sd[old], (old, new)


def test_single_file_loads_strict_into_tiny_models(tmp_path, models):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    sd = tiny_ldm()
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(12)[None]
    sd["alphas_cumprod"] = torch.rand(1000)
    sd["model_ema.num_updates"] = torch.tensor(7)
    save_file(sd, tmp_path / "sd.safetensors")
    out = load_sd15_single_file(tmp_path / "sd.safetensors", TINY_UNET, TINY_VAE, TINY_TEXT)
    unet, vae, text = models
    for model, part in ((unet, "unet"), (vae, "vae"), (text, "text_encoder")):
        model.load_state_dict(out[part], strict=True)
    mp, fp = "model.diffusion_model.", "first_stage_model."
    assert torch.equal(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight,
                       sd[mp + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"])
    assert torch.equal(unet.up_blocks[0].upsamplers[0].conv.weight, sd[mp + "output_blocks.1.1.conv.weight"])
    assert torch.equal(unet.up_blocks[1].upsamplers[0].conv.weight, sd[mp + "output_blocks.3.2.conv.weight"])
    assert torch.equal(unet.mid_block.resnets[1].conv1.weight, sd[mp + "middle_block.2.in_layers.2.weight"])
    assert torch.equal(unet.time_embedding.linear_2.bias, sd[mp + "time_embed.2.bias"])
    assert torch.equal(vae.decoder.up_blocks[1].resnets[0].conv1.weight, sd[fp + "decoder.up.0.block.0.conv1.weight"])
    assert torch.equal(vae.encoder.mid_block.attentions[0].to_q.weight, sd[fp + "encoder.mid.attn_1.q.weight"][:, :, 0, 0])
    assert torch.equal(vae.encoder.conv_norm_out.weight, sd[fp + "encoder.norm_out.weight"])
    assert torch.equal(text.state_dict()[[k for k in text.state_dict() if k.endswith("layers.1.mlp.fc1.weight")][0]],
                       sd["cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight"])
    # diffusers' own converters agree key for key and tensor for tensor
    ref_unet = convert_ldm_unet_checkpoint(sd, TINY_UNET)
    ref_vae = convert_ldm_vae_checkpoint(sd, TINY_VAE)
    assert ref_unet.keys() == out["unet"].keys() and ref_vae.keys() == out["vae"].keys()
    assert all(torch.equal(ref_unet[k], out["unet"][k]) for k in ref_unet)
    assert all(torch.equal(ref_vae[k], out["vae"][k]) for k in ref_vae)


def test_old_text_layout_and_ckpt_through_weights_only(tmp_path):
    new = tiny_ldm(seed=1)
    old = tiny_ldm(seed=1, text_prefix="cond_stage_model.transformer.")
    torch.save({"state_dict": old, "global_step": 10, "epoch": 1}, tmp_path / "old.ckpt")
    a = convert_sd15_ldm(new, TINY_UNET, TINY_VAE, TINY_TEXT)
    b = load_sd15_single_file(tmp_path / "old.ckpt", TINY_UNET, TINY_VAE, TINY_TEXT)
    assert a["text_encoder"].keys() == b["text_encoder"].keys()
    assert all(torch.equal(a["text_encoder"][k], b["text_encoder"][k]) for k in a["text_encoder"])


@pytest.mark.parametrize("edit, needle", [
    (lambda sd: sd.update({"model.diffusion_model.input_blocks.1.1.bogus.weight": torch.zeros(1)}), "input_blocks.1.1.bogus.weight"),
    (lambda sd: sd.update({"model.diffusion_model.zzz.weight": torch.zeros(1)}), "model.diffusion_model.zzz.weight"),
    (lambda sd: sd.update({"something_else": torch.zeros(1)}), "something_else"),
    (lambda sd: sd.pop("model.diffusion_model.out.2.bias"), "missing (conv_out.bias)"),
    (lambda sd: sd.pop("first_stage_model.decoder.up.1.upsample.conv.weight"), "decoder.up_blocks.0.upsamplers.0.conv.weight"),
    (lambda sd: sd.update({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)}),
     "mis-shaped (model.diffusion_model.input_blocks.0.0.weight (32, 9, 3, 3) vs model (32, 4, 3, 3))"),
    (lambda sd: sd.pop("cond_stage_model.transformer.text_model.final_layer_norm.bias"), "text encoder: 1 missing"),
])
def test_single_file_strict_errors(edit, needle):
    sd = tiny_ldm()
    edit(sd)
    with pytest.raises(InputError) as e:
        convert_sd15_ldm(sd, TINY_UNET, TINY_VAE, TINY_TEXT, source="SD1.5 checkpoint x.safetensors")
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and msg.startswith("SD1.5 checkpoint x.safetensors: ")


def test_not_an_sd15_ldm_file():
    with pytest.raises(InputError, match="SDXL"):
        convert_sd15_ldm({"conditioner.embedders.0.transformer.x": torch.zeros(1)}, TINY_UNET, TINY_VAE, TINY_TEXT)


class NotATensor:
    def __init__(self):
        self.payload = [1, 2, 3]


def test_read_weights_refuses_pickles_and_bad_files(tmp_path):
    torch.save({"w": NotATensor()}, tmp_path / "evil.ckpt")
    with pytest.raises(InputError, match=r"evil\.ckpt: refused, it holds pickled objects"):
        read_weights(tmp_path / "evil.ckpt")
    torch.save({"w": torch.ones(2), "name": "x"}, tmp_path / "mixed.pt")
    with pytest.raises(InputError, match=r"1 entries are not named tensors \(name\)"):
        read_weights(tmp_path / "mixed.pt")
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    with pytest.raises(InputError, match="holds a list"):
        read_weights(tmp_path / "list.pth")
    for text in (b"notackpt", b"hello world\n"):  # were "holds pickled objects" and "KeyError: 101"
        (tmp_path / "text.ckpt").write_bytes(text)
        with pytest.raises(InputError, match=r"text\.ckpt: not a torch checkpoint \(neither torch\.save's zip archive "
                                             r"nor a pickle\), expected \.ckpt weights or a \.safetensors file$"):
            read_weights(tmp_path / "text.ckpt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x01\x02garbage")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        read_weights(tmp_path / "bad.safetensors")
    (tmp_path / "bad.ckpt").write_bytes(b"garbage")
    with pytest.raises(InputError, match="bad.ckpt"):
        read_weights(tmp_path / "bad.ckpt")
    with pytest.raises(InputError, match="not found"):
        read_weights(tmp_path / "nope.safetensors")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(InputError, match="unsupported suffix"):
        read_weights(tmp_path / "w.npz")
    torch.save({"state_dict": {"a": torch.ones(3)}, "global_step": 3}, tmp_path / "ok.ckpt")
    assert torch.equal(read_weights(tmp_path / "ok.ckpt")["a"], torch.ones(3))


def test_diffusers_folder(tmp_path, models):
    unet, vae, text = models
    root = tmp_path / "sd15"
    unet.save_pretrained(root / "unet")
    text.save_pretrained(root / "text_encoder")
    (root / "vae").mkdir(parents=True)
    vae.save_config(root / "vae")
    torch.save(vae.state_dict(), root / "vae" / "diffusion_pytorch_model.bin")
    out = load_sd15_diffusers_folder(root)
    assert out["configs"]["unet"]["block_out_channels"] == [32, 32, 64]
    assert out["configs"]["text_encoder"]["hidden_size"] == 16
    for model, part in ((unet, "unet"), (vae, "vae"), (text, "text_encoder")):
        fresh = copy.deepcopy(model)
        fresh.load_state_dict(out[part], strict=True)
        ref = model.state_dict()
        assert all(torch.equal(ref[k], v) for k, v in out[part].items())

    bad = read_weights(root / "unet" / "diffusion_pytorch_model.safetensors")
    bad["down_blocks.0.extra.weight"] = torch.zeros(1)
    save_file(bad, root / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(InputError, match=r"unet/diffusion_pytorch_model.safetensors: 1 unexpected keys \(down_blocks.0.extra.weight\)"):
        load_sd15_diffusers_folder(root)
    (root / "text_encoder" / "model.safetensors").rename(root / "text_encoder" / "other.safetensors")
    with pytest.raises(InputError, match="has no model.safetensors"):
        load_sd15_diffusers_folder(root)
    (root / "text_encoder" / "config.json").unlink()
    (root / "text_encoder" / "other.safetensors").unlink()
    (root / "text_encoder").rmdir()
    with pytest.raises(InputError, match=r"missing sub-folder text_encoder/"):
        load_sd15_diffusers_folder(root)


# --------------------------------------------------------------------------------------- AnimateDiff

# Suffixes after "<block>.motion_modules.<m>.temporal_transformer." in guoyww's mm_sd_v15_v2.ckpt.
MM_ORIGINAL = [
    ("norm.weight", "c"), ("norm.bias", "c"), ("proj_in.weight", "cc"), ("proj_in.bias", "c"),
    *[(f"transformer_blocks.0.attention_blocks.{a}.{n}", s) for a in (0, 1) for n, s in (
        ("to_q.weight", "cc"), ("to_k.weight", "cc"), ("to_v.weight", "cc"),
        ("to_out.0.weight", "cc"), ("to_out.0.bias", "c"), ("pos_encoder.pe", "pe"))],
    ("transformer_blocks.0.norms.0.weight", "c"), ("transformer_blocks.0.norms.0.bias", "c"),
    ("transformer_blocks.0.norms.1.weight", "c"), ("transformer_blocks.0.norms.1.bias", "c"),
    ("transformer_blocks.0.ff.net.0.proj.weight", "8c,c"), ("transformer_blocks.0.ff.net.0.proj.bias", "8c"),
    ("transformer_blocks.0.ff.net.2.weight", "c,4c"), ("transformer_blocks.0.ff.net.2.bias", "c"),
    ("transformer_blocks.0.ff_norm.weight", "c"), ("transformer_blocks.0.ff_norm.bias", "c"),
    ("proj_out.weight", "cc"), ("proj_out.bias", "c"),
]


def sinusoid(length, c):
    pos = torch.arange(length).unsqueeze(1)
    div = torch.exp(torch.arange(0, c, 2) * (-math.log(10000.0) / c))
    pe = torch.zeros(1, length, c)
    pe[0, :, 0::2], pe[0, :, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    return pe


def original_motion_module(widths=(32, 32, 64), layers=1, mid=True, max_len=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"c": lambda c: (c,), "cc": lambda c: (c, c), "8c,c": lambda c: (8 * c, c), "8c": lambda c: (8 * c,),
              "c,4c": lambda c: (c, 4 * c)}
    modules = [(f"down_blocks.{b}", layers, c) for b, c in enumerate(widths)]
    modules += [("mid_block", 1, widths[-1])] if mid else []
    modules += [(f"up_blocks.{b}", layers + 1, c) for b, c in enumerate(reversed(widths))]
    sd = {}
    for block, count, c in modules:
        for m in range(count):
            for suffix, kind in MM_ORIGINAL:
                key = f"{block}.motion_modules.{m}.temporal_transformer.{suffix}"
                sd[key] = sinusoid(max_len, c) if kind == "pe" else torch.randn(shapes[kind](c), generator=g)
    return sd


def test_motion_module_original_v2(tmp_path, models):
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
    from diffusers import UNetMotionModel

    sd = original_motion_module()
    torch.save(sd, tmp_path / "mm_sd_v15_v2.ckpt")
    config, state = load_motion_module(tmp_path / "mm_sd_v15_v2.ckpt", TINY_UNET, norm_num_groups=8)
    assert config == dict(block_out_channels=[32, 32, 64], motion_layers_per_block=1,
                          motion_transformer_layers_per_block=1, motion_num_attention_heads=8,
                          motion_norm_num_groups=8, motion_max_seq_length=24, use_motion_mid_block=True,
                          motion_mid_block_layers_per_block=1, motion_transformer_layers_per_mid_block=1)
    adapter = MotionAdapter(**config)
    adapter.load_state_dict(state, strict=True)
    o = "down_blocks.1.motion_modules.0.temporal_transformer.transformer_blocks.0."
    tb = adapter.down_blocks[1].motion_modules[0].transformer_blocks[0]
    assert torch.equal(tb.attn2.to_k.weight, sd[o + "attention_blocks.1.to_k.weight"])
    assert torch.equal(tb.attn1.to_out[0].bias, sd[o + "attention_blocks.0.to_out.0.bias"])
    assert torch.equal(tb.norm2.weight, sd[o + "norms.1.weight"])
    assert torch.equal(tb.norm3.bias, sd[o + "ff_norm.bias"])
    assert torch.equal(tb.pos_embed.pe, sd[o + "attention_blocks.0.pos_encoder.pe"])
    assert torch.equal(adapter.up_blocks[2].motion_modules[1].proj_out.weight,
                       sd["up_blocks.2.motion_modules.1.temporal_transformer.proj_out.weight"])
    assert torch.equal(adapter.mid_block.motion_modules[0].norm.weight,
                       sd["mid_block.motion_modules.0.temporal_transformer.norm.weight"])
    ref = convert_animatediff_checkpoint_to_diffusers(sd)  # diffusers' map (it drops the pe tables)
    assert ref.keys() == {k for k in state if not k.endswith("pos_embed.pe")}
    assert all(torch.equal(ref[k], state[k]) for k in ref)
    UNetMotionModel.from_unet2d(models[0], adapter)  # plugs into the base UNet


def test_motion_module_v1_and_diffusers_naming(tmp_path):
    save_file(original_motion_module(mid=False, max_len=16), tmp_path / "mm_sd_v15.safetensors")
    config, state = load_motion_module(tmp_path / "mm_sd_v15.safetensors", TINY_UNET, norm_num_groups=8)
    assert config["use_motion_mid_block"] is False and config["motion_max_seq_length"] == 16
    MotionAdapter(**config).load_state_dict(state, strict=True)
    save_file(state, tmp_path / "adapter.safetensors")
    config2, state2 = load_motion_module(tmp_path / "adapter.safetensors", TINY_UNET, norm_num_groups=8)
    assert config2 == config and all(torch.equal(state[k], state2[k]) for k in state)


def test_motion_module_errors(tmp_path):
    sd = original_motion_module()
    sd["down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.foo.weight"] = torch.ones(1)
    torch.save(sd, tmp_path / "extra.ckpt")
    with pytest.raises(InputError, match=r"motion module extra.ckpt: 1 unexpected keys \(down_blocks.0.*foo.weight\)"):
        load_motion_module(tmp_path / "extra.ckpt", TINY_UNET, norm_num_groups=8)
    sd = original_motion_module()
    sd.pop("up_blocks.1.motion_modules.1.temporal_transformer.proj_out.bias")
    torch.save(sd, tmp_path / "missing.ckpt")
    with pytest.raises(InputError, match=r"missing \(up_blocks.1.motion_modules.1.proj_out.bias\)"):
        load_motion_module(tmp_path / "missing.ckpt", TINY_UNET, norm_num_groups=8)
    sd = original_motion_module()
    sd["up_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe"] *= 2
    torch.save(sd, tmp_path / "pe.ckpt")
    with pytest.raises(InputError, match="positional tables of attention_blocks.0 and .1 differ"):
        load_motion_module(tmp_path / "pe.ckpt", TINY_UNET, norm_num_groups=8)
    torch.save(original_motion_module(), tmp_path / "ok.ckpt")
    with pytest.raises(InputError, match=r"does not fit the base model: block_out_channels \[32, 32, 64\] vs base \[32, 64, 64\]"):
        load_motion_module(tmp_path / "ok.ckpt", dict(TINY_UNET, block_out_channels=[32, 64, 64]), norm_num_groups=8)
    with pytest.raises(InputError, match=r"does not fit the base model: motion layers per block \[1, 1, 1\] vs base layers_per_block \[2, 2, 2\]"):
        load_motion_module(tmp_path / "ok.ckpt", dict(TINY_UNET, layers_per_block=2), norm_num_groups=8)


# ---------------------------------------------------------------------------------------------- LoRA

R = 4
# module (in the tiny models) -> (kohya diffusers-named, kohya LDM-named, old diffusers key stem, out, in, conv)
UNET_LORA = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora", 32, 32, False),
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora", 32, 16, False),
    "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0": (
        "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn1_to_out_0",
        "lora_unet_output_blocks_3_1_transformer_blocks_0_attn1_to_out_0",
        "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn1.processor.to_out_lora", 32, 32, False),
    "down_blocks.0.attentions.0.proj_in": (
        "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_input_blocks_1_1_proj_in",
        "unet.down_blocks.0.attentions.0.proj_in.lora", 32, 32, True),
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2": (
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2",
        "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2",
        "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2.lora", 64, 256, False),
}
TEXT_LORA = {  # CLIP module (transformers naming without text_model.) -> (kohya, diffusers, old diffusers stem, out, in)
    "encoder.layers.0.self_attn.q_proj": ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                                          "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
                                          "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora", 16, 16),
    "encoder.layers.1.mlp.fc1": ("lora_te_text_model_encoder_layers_1_mlp_fc1",
                                 "text_encoder.text_model.encoder.layers.1.mlp.fc1",
                                 "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_linear_layer", 32, 16),
}


def lora_tensors(seed=0, ranks=None):
    g, out = torch.Generator().manual_seed(seed), {}
    for name, spec in {**UNET_LORA, **TEXT_LORA}.items():
        o, i, conv = spec[3], spec[4], (spec[5] if len(spec) > 5 else False)
        r = (ranks or {}).get(name, R)
        a, b = torch.randn(r, i, generator=g), torch.randn(o, r, generator=g)
        out[name] = (a[:, :, None, None], b[:, :, None, None]) if conv else (a, b)
    return out


def kohya_file(path, t, alphas=None, ldm=False):
    sd = {}
    for name, (a, b) in t.items():
        key = UNET_LORA[name][1 if ldm else 0] if name in UNET_LORA else TEXT_LORA[name][0]
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = a, b
        sd[f"{key}.alpha"] = torch.tensor(float((alphas or {}).get(name, a.shape[0])))
    save_file(sd, path)
    return path


def diffusers_file(path, t, metadata=None):
    sd = {}
    for name, (a, b) in t.items():
        key = f"unet.{name}" if name in UNET_LORA else TEXT_LORA[name][1]
        sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = a, b
    save_file(sd, path, metadata=metadata)
    return path


def old_diffusers_file(path, t):
    sd = {}
    for name, (a, b) in t.items():
        stem = UNET_LORA[name][2] if name in UNET_LORA else TEXT_LORA[name][2]
        sd[f"{stem}.down.weight"], sd[f"{stem}.up.weight"] = a, b
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def names(models):
    unet, _, text = models
    return {n for n, _ in unet.named_modules()}, {n for n, _ in text.named_modules()}


def test_lora_formats_map_to_the_same_peft_state_dict(tmp_path, names):
    t = lora_tensors()
    results = [load_lora(f, *names) for f in (
        kohya_file(tmp_path / "kohya.safetensors", t), kohya_file(tmp_path / "kohya_ldm.safetensors", t, ldm=True),
        diffusers_file(tmp_path / "pytorch_lora_weights.safetensors", t), old_diffusers_file(tmp_path / "old.bin", t))]
    for w in results:
        assert (w.rank, w.alpha, w.scale) == (R, float(R), 1.0)
        assert w.unet.keys() == results[0].unet.keys() and w.text_encoder.keys() == results[0].text_encoder.keys()
        assert all(torch.equal(w.unet[k], results[0].unet[k]) for k in w.unet)
        assert all(torch.equal(w.text_encoder[k], results[0].text_encoder[k]) for k in w.text_encoder)
    w = results[0]
    a, b = t["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert w.unet["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"] is not None
    assert torch.equal(w.unet["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"], b)
    assert torch.equal(w.text_encoder["encoder.layers.1.mlp.fc1.lora_A.weight"], t["encoder.layers.1.mlp.fc1"][0])


def test_lora_alphas_metadata_and_ranks(tmp_path, names):
    t = lora_tensors()
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w = load_lora(kohya_file(tmp_path / "k.safetensors", t, alphas={n: 8.0 for n in t} | {q: 2.0}), *names)
    assert (w.rank, w.alpha) == (R, 8.0)  # most modules: scale 2
    assert torch.allclose(w.unet[f"{q}.lora_B.weight"], t[q][1] * (0.5 / 2.0))  # its own scale 0.5, folded
    assert torch.allclose(w.delta_weight("unet", q), 0.5 * t[q][1] @ t[q][0])
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": R, "unet.lora_alpha": 2 * R, "text_encoder.r": R})}
    w = load_lora(diffusers_file(tmp_path / "m.safetensors", t, metadata=meta), *names)
    assert (w.rank, w.alpha, w.scale) == (R, 2.0 * R, 2.0)  # 5 UNet modules at scale 2 (metadata), 2 text at 1
    assert torch.allclose(w.delta_weight("unet", q), 2.0 * t[q][1] @ t[q][0])
    fc1 = "encoder.layers.1.mlp.fc1"
    assert torch.allclose(w.delta_weight("text_encoder", fc1), t[fc1][1] @ t[fc1][0])
    t2 = lora_tensors(ranks={q: 2})
    w = load_lora(kohya_file(tmp_path / "r.safetensors", t2), *names)
    cfg = w.lora_config("unet")
    assert w.rank == R and cfg.rank_pattern == {q: 2} and cfg.alpha_pattern == {q: 2.0}


def _merged_by_hand(model, part_tensors, scales):
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for name, (a, b) in part_tensors.items():
            mod = merged.get_submodule(name)
            delta = scales.get(name, 1.0) * (b.flatten(1) @ a.flatten(1))
            mod.weight += delta.reshape(mod.weight.shape)
    return merged


def test_lora_applied_with_peft_matches_hand_merge(tmp_path, models, names):
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    unet, _, text = models
    t = lora_tensors(seed=3, ranks={"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": 2})
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    alphas = {n: 2.0 for n in t} | {q: 1.0}
    w = load_lora(kohya_file(tmp_path / "k.safetensors", t, alphas=alphas), dict(unet.named_modules()),
                  dict(text.named_modules()))
    scales = {n: alphas[n] / t[n][0].shape[0] for n in t}

    lora_unet = copy.deepcopy(unet)
    lora_unet.add_adapter(w.lora_config("unet"))
    res = set_peft_model_state_dict(lora_unet, w.unet)
    assert not res.unexpected_keys
    # one layer, by hand: y = x (W + scale B A)^T
    x = torch.randn(3, 32)
    base = unet.get_submodule(q)
    a, b = t[q]
    with torch.no_grad():
        want = x @ (base.weight + scales[q] * b @ a).T
        assert torch.allclose(lora_unet.get_submodule(q)(x), want, atol=1e-5)
        # the whole UNet
        hand = _merged_by_hand(unet, {n: v for n, v in t.items() if n in UNET_LORA}, scales)
        sample, ts, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 16)
        got = lora_unet(sample, ts, encoder_hidden_states=ctx).sample
        assert torch.allclose(got, hand(sample, ts, encoder_hidden_states=ctx).sample, atol=1e-4)
        assert not torch.allclose(got, unet(sample, ts, encoder_hidden_states=ctx).sample, atol=1e-3)

        lora_text = copy.deepcopy(text)
        inject_adapter_in_model(w.lora_config("text_encoder"), lora_text)
        assert not set_peft_model_state_dict(lora_text, w.text_encoder).unexpected_keys
        hand = _merged_by_hand(text, {n: v for n, v in t.items() if n in TEXT_LORA}, scales)
        ids = torch.tensor([[0, 5, 9, 2]])
        assert torch.allclose(lora_text(ids).last_hidden_state, hand(ids).last_hidden_state, atol=1e-4)


def test_lora_errors(tmp_path, models, names):
    unet, _, text = models
    t = lora_tensors()
    sd = read_weights(kohya_file(tmp_path / "k.safetensors", t))
    sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn9_to_q.lora_down.weight"] = torch.ones(R, 32)
    sd["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.ones(R, 16)
    save_file(sd, tmp_path / "unknown.safetensors")
    with pytest.raises(InputError, match=r"LoRA unknown.safetensors: 2 keys match no LoRA layout or no module .*attn9_to_q"):
        load_lora(tmp_path / "unknown.safetensors", *names)
    sd = read_weights(tmp_path / "k.safetensors")
    sd.pop("lora_te_text_model_encoder_layers_1_mlp_fc1.lora_up.weight")
    save_file(sd, tmp_path / "half.safetensors")
    with pytest.raises(InputError, match=r"lora_te_text_model_encoder_layers_1_mlp_fc1.lora_down.weight has no up/B partner"):
        load_lora(tmp_path / "half.safetensors", *names)
    with pytest.raises(InputError, match="no text encoder names given"):
        load_lora(tmp_path / "k.safetensors", names[0])
    sd = read_weights(tmp_path / "k.safetensors")
    sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] = torch.ones(R, 32)  # 2-D for a Conv2d
    sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] = torch.ones(32, R)
    save_file(sd, tmp_path / "shape.safetensors")
    with pytest.raises(InputError, match=r"1 mis-shaped LoRA pairs \(lora_unet_down_blocks_0_attentions_0_proj_in"):
        load_lora(tmp_path / "shape.safetensors", dict(unet.named_modules()), dict(text.named_modules()))
    assert isinstance(load_lora(tmp_path / "k.safetensors", *names), LoraWeights)

"""`fpengine init --base ... --motion-module ... --lora ...`: composing a checkpoint from public files."""
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from engine.cli.app import main
from finephys.model.checkpoint import load_checkpoint
from finephys.model.assembly import assemble
from tests.test_convert import kohya_file, lora_tensors, original_motion_module, tiny_models


def _base_folder(root):
    unet, vae, text = tiny_models()
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    text.save_pretrained(root / "text_encoder")
    return root


def test_init_from_public_parts_round_trips(tmp_path):
    base = _base_folder(tmp_path / "sd15")
    mm = tmp_path / "mm_sd_v15_v2.ckpt"
    torch.save(original_motion_module(widths=(32, 32, 64), layers=1, mid=True, max_len=24), mm)
    lora = kohya_file(tmp_path / "style.safetensors", lora_tensors())
    out = tmp_path / "ckpt"
    r = CliRunner().invoke(main, ["init", "--base", str(base), "--motion-module", str(mm), "--lora", str(lora), str(out)])
    assert r.exit_code == 0, r.output
    parts = load_checkpoint(out, verify_hashes=True)
    assert parts.config.unet["motion_max_seq_length"] == 24 and parts.config.lora.rank > 0
    mm_key = "down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.weight"
    src = torch.load(mm, weights_only=True)
    assert torch.equal(parts.unet.state_dict()[mm_key],
                       src["down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight"])
    # Without pose weights the heatmap encoder is zero: pose features leave the UNet unchanged.
    model = assemble(parts)
    x = torch.randn(1, 4, 3, 8, 8)
    text = torch.randn(3, 77, 16)
    feats = model.encode_pose(torch.rand(3, 17, 64, 64))
    assert all(f.abs().max() == 0 for f in feats)
    torch.testing.assert_close(model.predict_noise(x, 10, text, feats), model.predict_noise(x, 10, text, None))
    # The LoRA is attached (peft layers) and changes the output.
    bare = load_checkpoint(out)
    bare.lora = {}
    plain = assemble(bare)
    assert (plain.predict_noise(x, 10, text, None) - model.predict_noise(x, 10, text, None)).abs().max() > 1e-5


def test_init_errors_are_one_line(tmp_path):
    base = _base_folder(tmp_path / "sd15")
    mm = tmp_path / "mm.ckpt"
    torch.save(original_motion_module(widths=(32, 64, 64), layers=1), mm)  # widths do not fit the base
    r = CliRunner().invoke(main, ["init", "--base", str(base), "--motion-module", str(mm), str(tmp_path / "o")])
    assert r.exit_code == 2 and "does not fit the base model" in r.output, r.output
    bad = tmp_path / "pose.safetensors"
    save_file({"lifter.nope": torch.zeros(2)}, bad)
    mm2 = tmp_path / "mm2.ckpt"
    torch.save(original_motion_module(widths=(32, 32, 64), layers=1), mm2)
    r = CliRunner().invoke(main, ["init", "--base", str(base), "--motion-module", str(mm2), "--pose-weights", str(bad),
                                  str(tmp_path / "o")])
    assert r.exit_code == 2 and "lifter" in r.output and "nope" in r.output, r.output
    assert not (tmp_path / "o").exists()
    r = CliRunner().invoke(main, ["init", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--demo" in r.output
    r = CliRunner().invoke(main, ["init", "--demo", "--vae-scale-factor", "8", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--vae-scale-factor goes with --demo --untrained" in r.output, r.output
    r = CliRunner().invoke(main, ["init", "--demo", "--untrained", "--vae-scale-factor", "16", str(tmp_path / "o")])
    assert r.exit_code == 2 and "'16' is not one of '4', '8'" in r.output, r.output
    assert not (tmp_path / "o").exists()

"""fpengine export: merged weights, ONNX graphs, manifest, stages, atomicity, bad input.

The demo checkpoint is exported once per precision (the ``engine16`` / ``engine32`` fixtures, conftest.py);
both exports run the parity check on small shapes (4 frames 64x64, 2 steps) and fail if it fails.
"""
import errno
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from engine.cli.app import main
from engine.check import export_parity
from export.build import export_engine
from export.contract import ShapeProfile, contracts, resolve_dims, trace_dims
from export.manifest import ENGINE_FORMAT_VERSION, read_engine_manifest
from finephys.files import sha256
from finephys.model.checkpoint import MANIFEST
from finephys.errors import InputError

def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# --- contracts --------------------------------------------------------------------------------

def test_contract_dims_and_profiles():
    from finephys.model.demo import demo_config

    cfg = demo_config()
    c = contracts(cfg)
    unet = c["unet"]
    assert unet.input_names == ["sample", "timestep", "encoder_hidden_states"] + [f"pose_feat_{k}" for k in range(4)]
    axes = unet.dynamic_axes()
    assert axes["sample"] == {0: "batch", 2: "frames", 3: "latent_height", 4: "latent_width"}
    assert axes["encoder_hidden_states"] == {0: "batch_frames"}  # the text batch is B*F, named apart
    dims = resolve_dims(demo_config(vae_scale_factor=8), batch=2, frames=3, height=64, width=96)
    assert (dims["latent_height"], dims["latent_width"]) == (8, 12)
    assert (dims["feat3_height"], dims["feat3_width"]) == (1, 2)  # 8x12 -> 4x6 -> 2x3 -> 1x2 (rounding up)
    dims = resolve_dims(cfg, batch=2, frames=3, height=64, width=96)  # the demo's VAE: 4 pixels a latent
    assert (dims["latent_height"], dims["latent_width"], dims["feat3_height"], dims["feat3_width"]) == (16, 24, 2, 3)
    profile = ShapeProfile.default(cfg)
    assert profile.frames == (1, 16, 32) and profile.height == (64, 128, 256)
    shapes = unet.profile_shapes(profile, cfg)
    assert shapes["encoder_hidden_states"] == ((1, 77, 32), (32, 77, 32), (64, 77, 32))
    # pose feature 0: batch*frames x the UNet's first block channels x the latent (256/4) at the largest shape
    assert shapes["pose_feat_0"][2] == (64, cfg.unet["block_out_channels"][0], 64, 64) and "timestep" not in shapes
    t = trace_dims(cfg)
    assert t["latent_width"] % 8 != 0 and t["height"] == 4 * t["latent_height"] and len({t["batch"], t["frames"], t["prompts"]}) > 1
    with pytest.raises(InputError, match="MIN <= OPT <= MAX"):
        ShapeProfile(frames=(4, 2, 8))
    with pytest.raises(InputError, match="multiples of 8"):
        ShapeProfile(height=(60, 64, 128))
    with pytest.raises(InputError, match=r"frames 40 is outside this engine's profile 1\.\.32"):
        profile.check("x", frames=40)


def test_onnx_external_data(tmp_path, demo_ckpt):
    """A graph past the size limit keeps its weights in one .onnx.data file beside it."""
    import onnxruntime as ort

    from export.onnx_export import export_onnx, graph_module
    from finephys.model.checkpoint import load_checkpoint

    parts = load_checkpoint(demo_ckpt)
    c = contracts(parts.config)["heatmap_encoder"]
    dims = trace_dims(parts.config)
    files = export_onnx(graph_module(parts, "heatmap_encoder"), c, c.sample_inputs(dims, "float32"), tmp_path,
                        external_limit=0)
    assert [f.name for f in files] == ["heatmap_encoder.onnx", "heatmap_encoder.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heatmap_encoder.onnx", "heatmap_encoder.onnx.data"]
    x = torch.rand(5, 17, 64, 128)
    got = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"]).run(None, {"heatmaps": x.numpy()})
    with torch.no_grad():
        want = parts.encoder(x)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-4)  # outputs up to ~5 here


# --- LoRA merge ---------------------------------------------------------------------------------

def test_merged_lora_equals_unmerged(demo_ckpt):
    from export.merge import load_merged
    from finephys.model.checkpoint import load_checkpoint
    from finephys.model.assembly import assemble

    model, report = load_merged(demo_ckpt)
    assert report["lora_merged"] and report["unet_max_abs_diff"] < 1e-5
    assert not any("lora" in k for k in model.parts.unet.state_dict())
    assert not any("lora" in k for k in model.parts.text_encoder.state_dict())
    # the merge matters: the merged UNet differs from the base weights without the LoRA
    base = load_checkpoint(demo_ckpt)
    key = next(k for k in base.unet.state_dict() if "attn1.to_q.weight" in k)
    assert not torch.equal(base.unet.state_dict()[key], model.parts.unet.state_dict()[key])
    # and the merged model gives the unmerged (peft) model's text embeddings
    ref = assemble(load_checkpoint(demo_ckpt))
    ids = torch.randint(0, 49406, (2, 77))
    with torch.no_grad():
        torch.testing.assert_close(model.parts.text_encoder(ids)[0], ref.parts.text_encoder(ids)[0], atol=1e-5, rtol=0)


# --- the engine directory ---------------------------------------------------------------------

def test_export_fp16_engine_directory(engine16, demo_ckpt):
    m = read_engine_manifest(engine16)
    assert m["format_version"] == ENGINE_FORMAT_VERSION and m["precision"] == "float16"
    assert m["source"]["sha256"] == sha256(demo_ckpt / MANIFEST)
    for component in ("text_encoder", "heatmap_encoder", "unet", "vae_decoder"):
        assert f"onnx/{component}.onnx" in m["files"]
    for rel, entry in m["files"].items():
        assert sha256(engine16 / rel) == entry["sha256"], rel
    assert set(m["tools"]) >= {"torch", "onnx", "onnxruntime", "diffusers", "tensorrt"}
    assert m["profile"]["frames"] == [1, 16, 32]
    unet = load_file(str(engine16 / "unet/diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in unet.values()} == {torch.float16} and not any("lora" in k for k in unet)
    assert {v.dtype for v in load_file(str(engine16 / "pose/lifter.safetensors")).values()} == {torch.float32}
    parity = m["parity"]
    assert parity["passed"] and parity["precision"] == "float16"
    assert parity["latents_max_abs_err"] <= 2 * parity["torch_fp16"]["latents_max_abs_err"] + 1e-3
    assert _leftovers(engine16.parent) == []


def test_export_fp32_parity(engine32):
    m = read_engine_manifest(engine32)
    assert m["precision"] == "float32" and m["parity"]["passed"]
    assert m["parity"]["latents_rel_err"] <= 1e-3


def test_export_again_keeps_every_stage(engine16, demo_ckpt):
    before = read_engine_manifest(engine16)["files"]
    lines = []
    export_engine(demo_ckpt, engine16, check=export_parity, log=lines.append)
    assert sum("up to date, kept" in line for line in lines) == 6, lines  # weights, 4 graphs, check
    assert read_engine_manifest(engine16)["files"] == before


def test_export_rebuilds_a_damaged_stage_only(engine32, demo_ckpt, tmp_path):
    out = tmp_path / "e"
    shutil.copytree(engine32, out)
    (out / "onnx/vae_decoder.onnx").write_bytes(b"broken")
    lines = []
    export_engine(demo_ckpt, out, precision="fp32", log=lines.append)
    assert "onnx:unet: up to date, kept" in lines and "weights: up to date, kept" in lines
    assert any(line.startswith("onnx: vae_decoder") for line in lines)
    assert sha256(out / "onnx/vae_decoder.onnx") == read_engine_manifest(engine32)["files"]["onnx/vae_decoder.onnx"]["sha256"]


# --- bad input -------------------------------------------------------------------------------

def _broken_ckpt(demo_ckpt, tmp_path, how):
    ck = tmp_path / "ck"
    shutil.copytree(demo_ckpt, ck)
    unet = ck / "unet/diffusion_pytorch_model.safetensors"
    if how == "missing file":
        unet.unlink()
    elif how == "corrupt":
        unet.write_bytes(b"\0" * 100)
    elif how in ("keys", "motion module"):
        sd = load_file(str(unet))
        if how == "keys":
            sd.pop(next(k for k in sd if k.startswith("conv_in")))
            sd["extra.weight"] = torch.zeros(1)
        else:  # a motion module of another width than the base model's
            k = next(k for k in sd if "motion_modules" in k and k.endswith("proj_in.weight"))
            sd[k] = torch.zeros(8, 8)
        save_file(sd, str(unet))
        manifest = json.loads((ck / MANIFEST).read_text())
        manifest["files"]["unet/diffusion_pytorch_model.safetensors"] = sha256(unet)
        (ck / MANIFEST).write_text(json.dumps(manifest))
    return ck


@pytest.mark.parametrize("how,words", [
    ("missing file", "missing"),
    ("corrupt", "sha256"),
    ("keys", "missing keys (conv_in"),
    ("motion module", "mis-shaped keys"),
])
def test_export_bad_checkpoint_one_line(demo_ckpt, tmp_path, how, words):
    ck = _broken_ckpt(demo_ckpt, tmp_path, how)
    out = tmp_path / "e"
    r = CliRunner().invoke(main, ["export", "--ckpt", str(ck), "--out", str(out)])
    assert r.exit_code == 2, r.output
    err = r.output.strip().splitlines()[-1]
    assert err.startswith("error:") and words in err and "Traceback" not in r.output, r.output
    if how == "keys":
        assert "unexpected keys (extra.weight)" in err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_export_full_disk_leaves_nothing(demo_ckpt, tmp_path, monkeypatch):
    import export.merge

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export.merge, "save_file", full)
    with pytest.raises(InputError, match="no space left"):
        export_engine(demo_ckpt, tmp_path / "e", check=export_parity, log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,words", [
    (["--ckpt", "nope"], "does not exist"),
    (["--frames", "1:2"], "MIN:OPT:MAX"),
    (["--frames", "1:16:64"], "at most 32 frames"),
    (["--height", "64:60:128"], "MIN <= OPT <= MAX"),
    (["--out", "nodir/e"], "does not exist"),
    (["--height", "8:100000:100000"], "--height 8:100000:100000: expected sizes up to 8192 pixels"),
    (["--batch", "1:3:2"], "batch: expected MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX, got 1:3:2"),
    (["--batch", "2:2:2"], "--batch 2:2:2: expected MIN 1 (a request without guidance) and MAX up to 128"),
    (["--batch", "1:2:256"], "--batch 1:2:256: expected MIN 1 (a request without guidance) and MAX up to 128"),
    (["--batch", "1:1:1", "--compile", None, "--compile-shape", "2x16x64x64"], "batch 2 is outside this engine's "
     "profile 1..1 (export with a wider --batch)"),
])
def test_export_bad_options(demo_ckpt, tmp_path, args, words):
    base = {"--ckpt": str(demo_ckpt), "--out": str(tmp_path / "e")}
    base.update(dict(zip(args[::2], args[1::2])))
    r = CliRunner().invoke(main, ["export", *[x for kv in base.items() for x in kv if x is not None]])
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output


def test_an_engine_without_a_guided_batch_refuses_guidance_before_loading(demo_ckpt, tmp_path):
    """`--batch 1:1:1` keeps guidance out of the engine's profile: export's parity check runs without
    it, and generate says so in one line and what to do, before anything loads."""
    out = tmp_path / "e"
    r = CliRunner().invoke(main, ["export", "--ckpt", str(demo_ckpt), "--out", str(out), "--batch", "1:1:1"])
    assert r.exit_code == 0, r.output
    manifest = read_engine_manifest(out)
    assert manifest["profile"]["prompts"] == [1, 1, 1] and manifest["parity"]["guidance_scale"] == 1.0
    args = ["generate", "--engine", str(out), "--backend", "onnxruntime", "--poses", "examples/walk.npz",
            "--prompt", "a walk", "--frames", "4", "--height", "64", "--width", "64", "--out", str(tmp_path / "v.mp4")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and r.output == (
        "error: --guidance 7.5: guidance runs a UNet batch of 2, outside this engine's profile 1..1 (re-export "
        "with a wider --batch, or --guidance 1)\n") and not (tmp_path / "v.mp4").exists()


def test_export_refuses_a_foreign_directory(demo_ckpt, tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = CliRunner().invoke(main, ["export", "--ckpt", str(demo_ckpt), "--out", str(out)])
    assert r.exit_code == 2 and "--overwrite" in r.output and (out / "keep.txt").exists(), r.output

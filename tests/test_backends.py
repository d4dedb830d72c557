"""Engine backends: onnxruntime against the reference, component by component and end to end
(the issue's done-when through the CLI), engine-directory refusals, and TensorRT (skipped where
``import tensorrt`` fails)."""
import json
import shutil
import types

import pytest
import torch
from click.testing import CliRunner

from engine.cli.app import main
from engine.video import read_video
from finephys.errors import InputError

SMALL = ["--frames", "4", "--height", "64", "--width", "64", "--steps", "2"]


@pytest.fixture(scope="module")
def reference(demo_ckpt):
    from engine.load import load_model

    return load_model(demo_ckpt)


def test_onnxruntime_components_match_reference(engine32, reference):
    """Each graph of the fp32 engine against the (unmerged-LoRA) reference, at shapes other than
    the traced ones."""
    from engine.backends import load_backend

    b = load_backend(engine32, "onnxruntime", "cpu")
    assert b.dtype == torch.float32 and b.latent_channels == 4 and b.device.type == "cpu"
    close = lambda a, r: torch.testing.assert_close(a.float(), r.float(), rtol=1e-4, atol=1e-4 * r.abs().max().item())  # noqa: E731
    prompts = ["", "a person jumping"]
    close(b.encode_text(prompts), reference.encode_text(prompts))
    heatmaps = torch.rand(5, 17, 64, 96)
    feats = b.encode_pose(heatmaps)
    ref_feats = reference.encode_pose(heatmaps)
    for f, r in zip(feats, ref_feats):
        close(f, r)
    s = b.vae_scale_factor
    sample = torch.randn(2, 4, 5, 64 // s, 96 // s)  # the heatmaps' latent size
    text = reference.encode_text(prompts).repeat_interleave(5, 0)
    both = [torch.cat([f, f]) for f in ref_feats]
    t = torch.tensor(801)
    close(b.predict_noise(sample, t, text, both), reference.predict_noise(sample, t, text, both))
    z = torch.randn(3, 4, 16, 8)
    close(b.decode_latents(z), reference.decode_latents(z))


def _fp16_component_errors(backend, demo_ckpt) -> dict:
    """Each graph of an fp16 engine and eager torch fp16 against the fp32 reference, on the same
    inputs (shapes other than the traced ones): component -> (engine error, torch fp16 error, scale)."""
    from engine.load import load_model

    ref32, ref16 = load_model(demo_ckpt), load_model(demo_ckpt, dtype=torch.float16)
    g = torch.Generator().manual_seed(0)
    prompts = ["", "a person jumping"]
    heatmaps = torch.rand(5, 17, 64, 96, generator=g)
    text = ref32.encode_text(prompts).repeat_interleave(5, 0)
    feats = [torch.cat([f, f]) for f in ref32.encode_pose(heatmaps)]
    s = ref32.vae_scale_factor
    sample, t, z = torch.randn(2, 4, 5, 64 // s, 96 // s, generator=g), torch.tensor(801), torch.randn(3, 4, 16, 8, generator=g)
    calls = {  # each model gets the inputs in its own precision, as the sampler passes them
        "text_encoder": lambda m: [m.encode_text(prompts)],
        "heatmap_encoder": lambda m: m.encode_pose(heatmaps.to(m.dtype)),
        "unet": lambda m: [m.predict_noise(sample.to(m.dtype), t, text.to(m.dtype), [f.to(m.dtype) for f in feats])],
        "vae_decoder": lambda m: [m.decode_latents(z.to(m.dtype))],
    }
    out = {}
    for name, call in calls.items():
        want, got, half = call(ref32), call(backend), call(ref16)
        err = max((a.float() - w).abs().max().item() for a, w in zip(got, want))
        err16 = max((a.float() - w).abs().max().item() for a, w in zip(half, want))
        out[name] = (err, err16, max(w.abs().max().item() for w in want))
    return out


def test_onnxruntime_fp16_components_within_the_fp16_rule(engine16, demo_ckpt):
    """DESIGN.md's fp16 rule measured here, component by component, not read from the parity
    report the exporter wrote: error <= 2 x eager torch fp16's error + 1e-3 x the output's scale."""
    from engine.backends import load_backend

    b = load_backend(engine16, "onnxruntime", "cpu")
    assert b.dtype == torch.float16
    for name, (err, err16, scale) in _fp16_component_errors(b, demo_ckpt).items():
        assert err <= 2 * err16 + 1e-3 * scale, (name, err, err16, scale)
        assert err16 > 0, name  # eager fp16 really ran in half precision


def test_cli_generate_on_engine_and_check(engine16, tmp_path):
    """The done-when: init --demo, export, generate --engine --backend onnxruntime, check."""
    out = tmp_path / "v.mp4"
    r = CliRunner().invoke(main, ["generate", "--engine", str(engine16), "--backend", "onnxruntime", "--poses",
                                  "examples/walk.npz", "--prompt", "a person walking", "--out", str(out), *SMALL])
    assert r.exit_code == 0, r.output
    assert read_video(out).shape == (4, 64, 64, 3)
    r = CliRunner().invoke(main, ["check", "--engine", str(engine16), "--backend", "onnxruntime", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output and "torch fp16" in r.output and "PSNR" in r.output, r.output


def test_check_fails_outside_tolerance(engine32, tmp_path, monkeypatch):
    """A backend that drifts from the reference makes check exit 1."""
    import engine.check

    monkeypatch.setattr(engine.check, "FP32_RTOL", 1e-12)
    r = CliRunner().invoke(main, ["check", "--engine", str(engine32), "--backend", "onnxruntime"])
    assert r.exit_code == 1 and "FAIL" in r.output, r.output


def test_engine_refusals(engine16, tmp_path, demo_ckpt):
    e = tmp_path / "e"
    shutil.copytree(engine16, e)
    gen = ["generate", "--poses", "examples/walk.npz", "--prompt", "x", "--out", str(tmp_path / "v.mp4")]
    r = CliRunner().invoke(main, [*gen, "--backend", "onnxruntime"])
    assert r.exit_code == 2 and "--engine" in r.output, r.output
    r = CliRunner().invoke(main, [*gen, "--engine", str(e), "--ckpt", str(demo_ckpt)])
    assert r.exit_code == 2 and "not both" in r.output, r.output
    r = CliRunner().invoke(main, [*gen, "--engine", str(e), *SMALL[:2], "--height", "512", "--width", "64"])
    assert r.exit_code == 2 and "height 512 is outside this engine's profile 64..256" in r.output, r.output
    r = CliRunner().invoke(main, [*gen, "--engine", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "does not exist" in r.output, r.output
    r = CliRunner().invoke(main, [*gen, "--engine", str(e), *SMALL, "--deep-cache", "2"])
    assert r.exit_code == 2 and "--deep-cache: the onnxruntime backend has no partial UNet" in r.output, r.output
    manifest = json.loads((e / "manifest.json").read_text())
    (e / "onnx/unet.onnx").write_bytes(b"x")
    r = CliRunner().invoke(main, ["check", "--engine", str(e)])
    assert r.exit_code == 2 and "onnx/unet.onnx" in r.output and "re-export" in r.output, r.output
    (e / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    r = CliRunner().invoke(main, [*gen, "--engine", str(e)])
    assert r.exit_code == 2 and "format_version 99" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "v.mp4").exists()


def test_check_needs_the_source_checkpoint(engine16, tmp_path, demo_ckpt):
    other = tmp_path / "other"
    shutil.copytree(demo_ckpt, other)
    (other / "finephys.json").write_text((other / "finephys.json").read_text().replace("finephys-demo", "other"))
    r = CliRunner().invoke(main, ["check", "--engine", str(engine16), "--ckpt", str(other)])
    assert r.exit_code == 2 and "not the checkpoint this engine was exported from" in r.output, r.output
    r = CliRunner().invoke(main, ["check", "--engine", str(engine16), "--ckpt", str(tmp_path)])  # was "is not there"
    assert r.exit_code == 2 and f"--ckpt {tmp_path} is not a FinePhys checkpoint folder (pass --ckpt" in r.output


# --- TensorRT --------------------------------------------------------------------------------

def test_tensorrt_absent_is_one_line(engine16, tmp_path):
    from export.tensorrt_build import tensorrt_status

    ok, why = tensorrt_status()
    if ok:
        pytest.skip("TensorRT works here: the GPU test below covers it")
    m = json.loads((engine16 / "manifest.json").read_text())
    assert m["tensorrt"]["plans"] == {} and m["tensorrt"]["status"] == why
    r = CliRunner().invoke(main, ["check", "--engine", str(engine16), "--backend", "tensorrt"])
    assert r.exit_code == 2 and r.output.startswith("error: --backend tensorrt: ") and why in r.output, r.output


def test_tensorrt_plans_for_another_gpu_are_refused(monkeypatch):
    """The refusal logic alone, with a stand-in tensorrt module (runs without TensorRT)."""
    import engine.backends.tensorrt as trt_backend
    from export.tensorrt_build import plan_name

    monkeypatch.setitem(__import__("sys").modules, "tensorrt", types.SimpleNamespace(__version__="10.9.0"))
    monkeypatch.setattr(trt_backend, "tensorrt_status", lambda: (True, "TensorRT 10.9.0"))
    monkeypatch.setattr(trt_backend, "gpu_name", lambda: "NVIDIA H100 80GB HBM3")
    rel = plan_name("unet", "10.9.0", "NVIDIA H100 80GB HBM3", "ab" * 32)
    assert rel == "trt/unet.trt10.9.0.NVIDIA-H100-80GB-HBM3.abababababababab.plan"
    plan = {"file": rel, "version": "10.9.0", "gpu": "NVIDIA H100 80GB HBM3"}
    assert trt_backend.matching_plans({"tensorrt": {"plans": {"unet": plan}}}) == {"unet": rel}
    for change, words in (({"gpu": "NVIDIA A100-SXM4-40GB"}, "for NVIDIA A100"), ({"version": "10.3.0"}, "TensorRT 10.3.0")):
        with pytest.raises(InputError, match=words):
            trt_backend.matching_plans({"tensorrt": {"plans": {"unet": {**plan, **change}}}})
    with pytest.raises(InputError, match="no TensorRT plans"):
        trt_backend.matching_plans({"tensorrt": {"status": "TensorRT is not installed here", "plans": {}}})


@pytest.mark.gpu
def test_tensorrt_export_and_check(demo_ckpt, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (import tensorrt fails)")
    pytest.importorskip("polygraphy", reason="polygraphy is not installed here")
    from engine.check import check_engine
    from export.build import export_engine

    out = tmp_path / "e"
    m = export_engine(demo_ckpt, out, log=lambda s: None)
    assert set(m["tensorrt"]["plans"]) == {"text_encoder", "heatmap_encoder", "unet", "vae_decoder"}
    report = check_engine(out, "tensorrt", ckpt=demo_ckpt, device="cuda")
    assert report["passed"], report

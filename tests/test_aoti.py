"""AOTInductor packages (``engine.aoti``, ``engine.backends.aoti``): the weights fed to a package
by name (fused projections, channels-last, buffers), and on the CPU a packaged engine that
generates what the reference generates, in a new process that imports none of diffusers, peft,
transformers or tokenizers (nor Dynamo or Inductor), refuses a tampered package and says which shape it lacks."""
import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from finephys.errors import InputError

from engine.aoti import derive_constants, package_dims


def test_constants_derive_fused_projections_channels_last_and_buffers():
    w = {"a.to_q.weight": torch.ones(2, 3), "a.to_k.weight": 2 * torch.ones(2, 3), "a.to_v.weight": 3 * torch.ones(2, 3),
         "b.to_k.weight": torch.zeros(1, 3), "b.to_v.weight": torch.ones(1, 3), "conv.weight": torch.randn(4, 3, 2, 2)}
    fqns = ["unet.unet.a.to_qkv.weight", "unet.unet.b.to_kv.weight", "unet.unet.conv.weight", "unet.unet.pos"]
    out = derive_constants("unet", fqns, w, {"pos": torch.arange(3)})
    assert out["unet.unet.a.to_qkv.weight"][:, 0].tolist() == [1, 1, 2, 2, 3, 3]
    assert out["unet.unet.b.to_kv.weight"][:, 0].tolist() == [0, 1]
    assert out["unet.unet.conv.weight"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out["unet.unet.conv.weight"], w["conv.weight"])
    assert out["unet.unet.pos"].tolist() == [0, 1, 2]
    # the heatmap encoder's convolutions stay as stored (the triton backend leaves them contiguous)
    enc = derive_constants("heatmap_encoder", ["encoder.conv.weight"], w, {})
    assert enc["encoder.conv.weight"].is_contiguous()
    with pytest.raises(KeyError, match="lack"):
        derive_constants("unet", ["unet.unet.missing.weight"], w, {})
    with pytest.raises(KeyError, match="outside"):
        derive_constants("unet", ["vae.conv.weight"], w, {})


def test_load_says_which_packages_it_skips_and_which_are_stale(tmp_path, monkeypatch):
    """Packages built for another torch are skipped after one line; packages built from older code
    of the UNet step still run, after one line asking for a rebuild (the packaged temporal kernel
    of engines before 283252d was 4-7x slower); current packages load without a word."""
    import engine.backends.aoti as aoti
    import export.manifest
    from engine.precompile import code_hash, environment

    info = {"env": environment(), "code": code_hash(), "packages": [{"component": "unet", "key": "2x4x4x16x16"}]}
    monkeypatch.setattr(export.manifest, "read_engine_manifest", lambda d: {"compiled": info})
    monkeypatch.setattr(aoti, "PackagedTritonModel", lambda *a, **k: "model")
    lines = []
    assert aoti.load_packaged(tmp_path, "cpu", log=lines.append) == "model" and lines == []
    info["code"] = "0" * 64
    assert aoti.load_packaged(tmp_path, "cpu", log=lines.append) == "model"
    assert len(lines) == 1 and "another version of the UNet step's code" in lines[0] and "--compile" in lines[0]
    info["env"] = {**environment(), "torch": "2.9.0"}
    lines.clear()
    assert aoti.load_packaged(tmp_path, "cpu", log=lines.append) is None
    assert len(lines) == 1 and "torch 2.9.0" in lines[0], lines


def test_a_packaged_engine_batches_requests_only_where_packages_cover_the_batch(engine16):
    """Serve's batching asks ``fits_batch``: within the profile (UNet batch and prompts up to 2),
    and where one request of a shape runs from packages, a batch of them must too (else the
    batch would compile just in time in the middle of serving). Shapes without packages batch as
    the profile allows."""
    from engine.backends.aoti import PackagedTritonModel
    from finephys.sampler.options import Plan

    def model(*keys):
        return PackagedTritonModel(engine16, "cpu", [{"component": c, "key": k} for c, k in keys])

    guided = Plan(frames=16, height=64, width=64, steps=2, guidance=7.5, length=16, stride=4)
    plain = dataclasses.replace(guided, guidance=1.0)
    deep = dataclasses.replace(plain, deep_cache=(2, 1))
    text1, text2 = ("text_encoder", "1x77"), ("text_encoder", "2x77")
    unet1, unet2 = ("unet", "1x4x16x16x16"), ("unet", "2x4x16x16x16")  # 64x64 at 4 pixels a latent
    default = model(text2, unet2)  # export --compile's default shape: one request with guidance
    assert default.fits_batch(guided, 1) and not default.fits_batch(guided, 2)  # a UNet batch of 4: over the profile
    # (the profile's batch of 2 leaves unguided requests as the only batches the package rule decides)
    assert default.fits_batch(plain, 2)  # unguided requests have no package either way
    unguided = model(text1, unet1)
    assert unguided.fits_batch(plain, 1) and not unguided.fits_batch(plain, 2)
    assert model(text1, unet1, unet2).fits_batch(plain, 2) is False  # no text encoder for 2 prompts
    assert model(text1, text2, unet1, unet2).fits_batch(plain, 2)
    cached = [("unet_cache_d1", "1x4x16x16x16"), ("unet_shallow_d1", "1x4x16x16x16")]
    assert not model(text1, text2, unet1, unet2, *cached).fits_batch(deep, 2)
    assert model(text1, text2, *cached, *[(c, "2x4x16x16x16") for c, _ in cached]).fits_batch(deep, 2)


def test_a_decode_chunk_without_a_package_runs_padded_in_a_packaged_one(engine16):
    """A 16-frame engine's decoder is packaged for 8-frame chunks, but a long clip's windows finish
    12 frames at a time (8 + 4): the 4 run in the 8-frame package (the VAE decodes each frame on
    its own) instead of compiling just in time, or stopping a --require-compiled run mid-clip."""
    from engine.backends.aoti import PackagedTritonModel

    model = PackagedTritonModel(engine16, "cpu", [{"component": "vae_decoder", "key": "8x4x16x16"}],
                                require_compiled=True)
    seen = []

    def run(component, feeds):
        (z,) = feeds.values()
        seen.append((component, tuple(z.shape)))
        return [z[:, :3] * 2 + torch.arange(len(z), dtype=z.dtype).view(-1, 1, 1, 1)]  # frame by frame, in order

    model._run = run
    z = torch.randn(4, 4, 16, 16)
    out = model.decode_latents(z)
    assert seen == [("vae_decoder", (8, 4, 16, 16))]
    assert torch.equal(out, z[:, :3].half() * 2 + torch.arange(4, dtype=torch.half).view(-1, 1, 1, 1))
    with pytest.raises(InputError, match="no compiled vae_decoder package for shape 4x4x16x12"):
        model.decode_latents(torch.randn(4, 4, 16, 12))  # no package at this latent size


def test_package_dims_cover_the_sampler_calls_of_a_shape(demo_ckpt):
    from finephys.model.checkpoint import read_config

    cfg = read_config(demo_ckpt)
    got = [(c, d.get("decode_batch"), d["prompts"], d["frames"]) for c, d in package_dims(cfg, 2, 20, 128, 128)]
    # 20 frames decode as 8 + 8 + 4; the text encoder sees the two prompts of guidance
    assert got == [("text_encoder", 1, 2, 20), ("heatmap_encoder", 1, 2, 20), ("unet", 1, 2, 20),
                   ("vae_decoder", 4, 2, 20), ("vae_decoder", 8, 2, 20)]


def _add_packages(eng, shapes, depths=()):
    """Build CPU packages into a copy of an fp32 engine, prepared as the triton backend prepares
    its modules, and list them in its manifest as ``export --compile`` does."""
    from engine.aoti import WEIGHTS, build_packages
    from engine.fast_unet import prepare_unet
    from engine.precompile import environment
    from export.manifest import engine_config, read_engine_manifest
    from finephys.files import sha256
    from finephys.model.build import build_text_encoder, build_unet, build_vae
    from finephys.model.encoder import HeatmapEncoder
    from finephys.model.unet import PoseGuidedUNet
    from finephys.model.weights import build_loaded

    cfg = engine_config(read_engine_manifest(eng))
    load = lambda build, c: build_loaded(lambda: build(cfg), eng / WEIGHTS[c]).eval().requires_grad_(False)  # noqa: E731
    parts = SimpleNamespace(unet=load(build_unet, "unet"), vae=load(build_vae, "vae_decoder"),
                            text_encoder=load(build_text_encoder, "text_encoder"),
                            encoder=load(lambda c: HeatmapEncoder(c.encoder), "heatmap_encoder"))
    prepare_unet(PoseGuidedUNet(parts.unet), temporal_kernel=False)
    parts.vae.to(memory_format=torch.channels_last)
    entries = build_packages(parts, cfg, "fp32", shapes, eng, log=lambda s: None, depths=depths)
    manifest = json.loads((eng / "manifest.json").read_text())
    for e in entries:
        for rel in filter(None, (e["file"], e.get("buffers"))):
            manifest["files"][rel] = {"sha256": sha256(eng / rel), "bytes": (eng / rel).stat().st_size}
    manifest["compiled"] = {"env": environment(), "steps": [], "packages": entries}
    (eng / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return entries


@pytest.fixture(scope="module")
def packaged(tmp_path_factory, engine32):
    eng = tmp_path_factory.mktemp("packaged") / "e"
    shutil.copytree(engine32, eng)
    _add_packages(eng, [(2, 4, 64, 64)], depths=(1,))
    return eng


_FRESH = textwrap.dedent("""
    import sys, torch
    from engine.backends.aoti import load_packaged
    from finephys.poses.clip import load_clip
    from finephys.sampler.options import GenerateOptions
    from finephys.sampler.stream import generate
    model = load_packaged(sys.argv[1], "cpu")
    opts = GenerateOptions("a person in a red shirt walking", num_frames=4, height=64, width=64,
                           num_inference_steps=3, seed=1)
    out = generate(model, load_clip("examples/walk.npz"), opts, progress=False)
    heavy = sorted(m for m in sys.modules if m.startswith(("diffusers", "peft", "transformers", "tokenizers",
                                                           "torch._dynamo", "torch._inductor", "triton")))
    torch.save({"latents": out.latents, "heavy": heavy, "unet_packages": model.package_calls}, sys.argv[2])
""")


def test_the_packaged_path_imports_no_triton():
    """What `fpengine generate --engine E --backend triton` imports to run packages loads no triton
    (their kernels are compiled in; the pose stack and heatmaps take the reference): importing it
    cost 0.2 s of the start-up on an H100's host. The slow test below checks a whole generation."""
    code = ("import sys, engine.cli.app, engine.load, engine.backends, engine.backends.aoti, engine.cuda_graph, "
            "engine.device_weights, engine.outputs, finephys.sampler.stream\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.slow
def test_a_packaged_engine_generates_as_the_reference_in_a_new_process(packaged, demo_ckpt, tmp_path):
    from engine.load import load_model
    from finephys.poses.clip import load_clip
    from finephys.sampler.options import GenerateOptions
    from finephys.sampler.stream import generate

    out = tmp_path / "run.pt"
    subprocess.run([sys.executable, "-c", _FRESH, str(packaged), str(out)], check=True)
    run = torch.load(out)
    assert run["heavy"] == [] and run["unet_packages"] == 1, run
    ref = load_model(demo_ckpt, "cpu")
    opts = GenerateOptions("a person in a red shirt walking", num_frames=4, height=64, width=64,
                           num_inference_steps=3, seed=1)
    want = generate(ref, load_clip("examples/walk.npz"), opts, progress=False).latents
    err = (run["latents"] - want).abs().max().item()
    assert err < 1e-3, err  # the same fp32 weights (LoRA merged) through compiled graphs


@pytest.mark.slow
def test_packaged_engine_refuses_a_missing_shape_and_a_tampered_package(packaged, tmp_path):
    from engine.backends.aoti import load_packaged

    model = load_packaged(packaged, "cpu", require_compiled=True)
    side = 64 // model.vae_scale_factor  # the packaged profile is 4 frames at 64x64
    packaged_shape, other = (2, 4, 4, side, side), (2, 4, 4, side, side + 2)
    text = torch.zeros(2 * 4, 77, model.config.unet["cross_attention_dim"])
    feats = model.encode_pose(torch.zeros(4, model.config.encoder.num_joints, 64, 64))
    feats = [f.repeat(2, 1, 1, 1) for f in feats]
    assert model.predict_noise(torch.zeros(packaged_shape), 500, text, feats).shape == packaged_shape
    shown = "x".join(map(str, packaged_shape))
    with pytest.raises(InputError, match=rf"--require-compiled: no compiled unet package for shape "
                                         rf"{'x'.join(map(str, other))} \(packaged: {shown}\)"):
        model.predict_noise(torch.zeros(other), 500, text, feats)
    with pytest.raises(InputError, match=f"--require-compiled: no compiled DeepCache package at depth 2 for shape "
                                         f"{shown}"):
        model.predict_noise_cached(torch.zeros(packaged_shape), 500, text, feats, 2)
    bad = tmp_path / "bad"
    shutil.copytree(packaged, bad)
    unet = next(bad.glob("compiled/unet-*.pt2"))
    data = bytearray(unet.read_bytes())
    data[len(data) // 2] ^= 1
    unet.write_bytes(bytes(data))
    manifest = json.loads((bad / "manifest.json").read_text())
    assert manifest["files"][f"compiled/{unet.name}"]["sha256"] != hashlib.sha256(data).hexdigest()
    tampered = load_packaged(bad, "cpu")
    with pytest.raises(InputError, match="does not match its sha256"):
        tampered.predict_noise(torch.zeros(packaged_shape), 500, text, feats)


@pytest.mark.slow
def test_warm_up_loads_and_runs_every_package_of_each_packaged_shape(packaged):
    """What serve replicas call before taking requests: afterwards no package is loaded on demand."""
    from engine.backends.aoti import load_packaged

    model = load_packaged(packaged, "cpu", require_compiled=True)
    assert model.compiled_shapes() == ["2x4x64x64"] and not model._runners
    model.warm_up()
    assert sorted(model._runners) == sorted(model.packages)
    assert model.package_calls == 3  # the UNet step, and DeepCache's full and shallow steps at depth 1


@pytest.mark.slow
def test_a_long_clip_decodes_its_short_chunks_in_the_packages(packaged, demo_ckpt):
    """10 frames through 4-frame windows finish 3, 3 and 4 frames at a time; the packaged decoder
    (4-frame chunks) decodes the 3s padded, with no just-in-time fallback, as the reference does."""
    from engine.backends.aoti import load_packaged
    from engine.load import load_model
    from finephys.poses.clip import load_clip
    from finephys.sampler.options import GenerateOptions
    from finephys.sampler.stream import generate

    opts = GenerateOptions("a person in a red shirt walking", num_frames=10, height=64, width=64,
                           num_inference_steps=2, seed=1, context_length=4, context_stride=3)
    model = load_packaged(packaged, "cpu", require_compiled=True)
    got = generate(model, load_clip("examples/walk.npz"), opts, progress=False).frames
    assert model._jit is None and got.shape == (10, 64, 64, 3)
    want = generate(load_model(demo_ckpt, "cpu"), load_clip("examples/walk.npz"), opts, progress=False).frames
    assert np.abs(got.astype(int) - want).max() <= 2


@pytest.mark.slow
def test_deep_cache_runs_its_own_packages_as_the_reference_runs_it(packaged, demo_ckpt):
    from engine.backends.aoti import load_packaged
    from engine.load import load_model
    from finephys.poses.clip import load_clip
    from finephys.sampler.options import GenerateOptions
    from finephys.sampler.stream import generate

    opts = GenerateOptions("a person in a red shirt walking", num_frames=4, height=64, width=64,
                           num_inference_steps=5, seed=1, deep_cache=2, deep_cache_depth=1)
    model = load_packaged(packaged, "cpu", require_compiled=True)  # no just-in-time fallback allowed
    got = generate(model, load_clip("examples/walk.npz"), opts, progress=False).latents
    assert model.package_calls == 2 and model._jit is None  # DeepCache's full and shallow packages
    want = generate(load_model(demo_ckpt, "cpu"), load_clip("examples/walk.npz"), opts, progress=False).latents
    plain = generate(model, load_clip("examples/walk.npz"), dataclasses.replace(opts, deep_cache=1),
                     progress=False).latents
    assert (got - want).abs().max().item() < 1e-3
    assert (got - plain).abs().max().item() > 1e-3  # the shallow steps did run: DeepCache changes the result
    # the three UNet packages are fed one set of constants (one fused QKV copy, not three)
    runners = [r for (c, _), r in model._runners.items() if c.startswith("unet")]
    shared = set.intersection(*(set(r.constants) for r in runners))
    assert len(runners) == 3 and any("to_qkv" in f for f in shared)
    assert all(len({id(r.constants[f]) for r in runners}) == 1 for f in shared)

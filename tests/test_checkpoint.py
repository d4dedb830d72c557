import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from finephys.model.checkpoint import load_checkpoint
from finephys.model.demo import load_demo
from finephys.errors import InputError


def test_demo_checkpoint_round_trip(demo_ckpt):
    parts = load_checkpoint(demo_ckpt, verify_hashes=True)
    demo = load_demo()
    for name in ("lifter", "physnet", "encoder", "unet", "vae", "text_encoder"):
        a, b = getattr(parts, name).state_dict(), getattr(demo, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert parts.lora.keys() == demo.lora.keys() and len(parts.lora) > 0
    manifest = json.loads((demo_ckpt / "finephys.json").read_text())
    assert manifest["format_version"] == 1 and "unet/diffusion_pytorch_model.safetensors" in manifest["files"]


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_and_misshaped_weights_are_named(demo_ckpt, tmp_path):
    ck = _copy(demo_ckpt, tmp_path / "a")
    path = ck / "pose/physnet.safetensors"
    sd = load_file(path)
    key = sorted(sd)[0]
    sd[key] = torch.zeros(3, 3)
    del sd[sorted(sd)[1]]
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, path)
    with pytest.raises(InputError) as err:
        load_checkpoint(ck)
    msg = str(err.value)
    assert "physnet.safetensors" in msg and "1 missing" in msg and "extra.weight" in msg and key in msg
    assert "\n" not in msg

    (ck / "vae/diffusion_pytorch_model.safetensors").unlink()
    (ck / "pose/physnet.safetensors").unlink()
    with pytest.raises(InputError, match="missing"):
        load_checkpoint(ck)


def test_corrupt_file_and_wrong_version(demo_ckpt, tmp_path):
    ck = _copy(demo_ckpt, tmp_path / "b")
    (ck / "pose/lifter.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="lifter.safetensors"):
        load_checkpoint(ck)
    manifest = json.loads((ck / "finephys.json").read_text())
    manifest["format_version"] = 99
    (ck / "finephys.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="format_version 99"):
        load_checkpoint(ck)
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "encoder"])
def test_build_loaded_gives_the_load_strict_module_without_initialising(component, tmp_path):
    """What the triton backend loads an engine with: the same tensors (dtype included) and the same
    non-persistent buffers as building, initialising and loading, and parameters never allocated."""
    from finephys.model.build import build_text_encoder, build_unet, build_vae
    from finephys.model.demo import demo_config
    from finephys.model.encoder import HeatmapEncoder
    from finephys.model.weights import build_loaded, load_strict, parameters_on_meta

    cfg = demo_config()
    build = {"unet": build_unet, "vae": build_vae, "text_encoder": build_text_encoder,
             "encoder": lambda c: HeatmapEncoder(c.encoder)}[component]
    torch.manual_seed(0)
    path = tmp_path / "w.safetensors"
    save_file({k: v.half().contiguous() for k, v in build(cfg).state_dict().items()}, str(path))
    want = build(cfg).half()
    load_strict(want, path)
    got = build_loaded(lambda: build(cfg), path)
    sd_want, sd_got = want.state_dict(), got.state_dict()
    assert sd_got.keys() == sd_want.keys()
    for k in sd_want:
        assert sd_got[k].dtype == sd_want[k].dtype and torch.equal(sd_got[k], sd_want[k]), k
    buffers = dict(want.named_buffers())
    for k, b in got.named_buffers():
        assert b.device.type == "cpu" and torch.equal(b.to(buffers[k].dtype), buffers[k]), k
    with parameters_on_meta():
        m = build(cfg)
    assert {p.device.type for p in m.parameters()} == {"meta"}
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"  # the patch is gone afterwards


def test_build_loaded_names_what_does_not_fit(tmp_path):
    from finephys.model.weights import build_loaded

    path = tmp_path / "w.safetensors"
    save_file({"weight": torch.zeros(3, 2)}, str(path))
    with pytest.raises(InputError, match="1 missing keys \\(bias\\).*mis-shaped"):
        build_loaded(lambda: torch.nn.Linear(2, 2), path)


@pytest.mark.parametrize("change, said", [(lambda c: c.pop("config"), "bad config ('config')"),
                                          (lambda c: c["config"].update(num_frames="x"), "num_frames is 'x', expected int"),
                                          (lambda c: c["config"]["pose"]["lifter"].update(dim=2.5),
                                           "pose.lifter.dim is 2.5, expected int"),
                                          (lambda c: c["config"]["pose"].update(fuse_weight=3), "fuse_weight"),
                                          (lambda c: c["config"].update(lora=4), "lora is 4, expected an object"),
                                          (lambda c: c["config"]["pose"].update(lifter=[1, 2]),
                                           "pose.lifter is [1, 2], expected an object")])
def test_a_config_of_the_wrong_shape_is_refused_by_every_command(demo_ckpt, tmp_path, change, said):
    """A hand-edited finephys.json: one line naming the field, from generate, export, train and poses alike."""
    from click.testing import CliRunner

    from engine.cli.app import main
    from finephys.model.checkpoint import read_config

    ck = _copy(demo_ckpt, tmp_path / "c")
    manifest = json.loads((ck / "finephys.json").read_text())
    change(manifest)
    (ck / "finephys.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="bad config") as err:
        read_config(ck)
    assert said in str(err.value)
    for args in (["generate", "--poses", "examples/walk.npz", "--prompt", "a walk", "--out", str(tmp_path / "v.mp4")],
                 ["export", "--out", str(tmp_path / "e")],
                 ["train", "--data", "render:examples", "--out", str(tmp_path / "t"), "--smoke"],
                 ["poses", "--poses", "examples/walk.npz", "--out", str(tmp_path / "p.npz")]):
        r = CliRunner().invoke(main, [*args, "--ckpt", str(ck)])
        assert r.exit_code == 2 and said in r.output and len(r.output.strip().splitlines()) == 1, (args, r.output)


def test_a_written_checkpoint_and_engine_take_the_umasks_permissions(demo_ckpt, engine32):
    """Others may read what init, train and export write, as with any file the user makes (the
    temporary folder they are built in, and safetensors' files, start private)."""
    from finephys.files import file_mode

    for root in (demo_ckpt, engine32):
        modes = {p: p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}
        wrong = {str(p): oct(m) for p, m in modes.items() if m != file_mode(directory=p.is_dir())}
        assert not wrong, wrong

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

"""fpengine train: the CPU smoke run, resuming, and bad training data refused before any work."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engine.cli.app import main
from finephys.model.checkpoint import load_checkpoint
from finephys.poses.clip import PoseClip, save_clip


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("start") / "demo"
    r = CliRunner().invoke(main, ["init", "--demo", "--untrained", str(out)])
    assert r.exit_code == 0, r.output
    return out


def _render_spec(motion):
    return f"render:{motion}"


def _train(ckpt, data, out, *extra):
    return CliRunner().invoke(main, ["train", "--ckpt", str(ckpt), "--data", data, "--out", str(out),
                                     "--train", "encoder,lora,unet", "--smoke", *extra])


def _weights(ckpt):
    parts = load_checkpoint(ckpt)
    named = {f"encoder.{k}": v for k, v in parts.encoder.state_dict().items()}
    named.update({f"lora.{k}": v for k, v in parts.lora.items()})
    return named


def test_smoke_run_writes_a_checkpoint_and_resuming_continues_it_exactly(untrained, made_motion, tmp_path):
    """2 steps then --resume to 3 give the weights of 3 steps in one go (the same batches, noise,
    optimiser state and EMA), and the result is a checkpoint every command loads."""
    data = _render_spec(made_motion)
    r = _train(untrained, data, tmp_path / "a", "--steps", "3")
    assert r.exit_code == 0, r.output
    r = _train(untrained, data, tmp_path / "b", "--steps", "2")
    assert r.exit_code == 0, r.output
    state = tmp_path / "b.training"
    assert (state / "loss.png").stat().st_size > 1000 and (state / "optimizer.pt").is_file()
    r = _train(untrained, data, tmp_path / "b", "--steps", "3")  # no --resume: the state is not thrown away
    assert r.exit_code == 2 and "--resume" in r.output
    r = _train(untrained, data, tmp_path / "b", "--steps", "3", "--resume")
    assert r.exit_code == 0, r.output
    a, b, start = _weights(tmp_path / "a"), _weights(tmp_path / "b"), _weights(untrained)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    moved = [k for k in a if k in start and not torch.equal(a[k], start[k])]
    assert any(k.startswith("encoder.") for k in moved)  # it trained
    r = CliRunner().invoke(main, ["generate", "--ckpt", str(tmp_path / "a"), "--poses", "examples/walk.npz",
                                  "--prompt", "a person in a red shirt and black trousers on grass",
                                  "--out", str(tmp_path / "v.mp4"), "--frames", "4", "--height", "64",
                                  "--width", "64", "--steps", "1"])
    assert r.exit_code == 0, r.output


def _sample(folder, name, video_frames, clip_frames, caption="a person in a red shirt and black trousers on grass"):
    from engine.video import write_video

    rng = np.random.default_rng(0)
    write_video(rng.integers(0, 255, (video_frames, 64, 64, 3), dtype=np.uint8), folder / f"{name}.mp4", 8.0)
    kp = rng.uniform(10, 50, (clip_frames, 17, 2)).astype(np.float32)
    save_clip(PoseClip(kp, np.ones((clip_frames, 17), np.float32), "h36m17", (64, 64), 8.0), folder / f"{name}.npz")
    (folder / f"{name}.txt").write_text(caption)


@pytest.mark.parametrize("case, message", [
    ("lengths", "has 12 frames but clip0.npz has 10"),
    ("caption", "tokens"),
    ("empty", "no .mp4 files"),
])
def test_bad_video_data_is_refused_in_one_line_before_anything_is_written(untrained, tmp_path, case, message):
    data = tmp_path / "data"
    data.mkdir()
    if case == "lengths":
        _sample(data, "clip0", 12, 10)
    elif case == "caption":
        _sample(data, "clip0", 12, 12, caption="a person in a red shirt " * 20)
    out = tmp_path / "out"
    r = _train(untrained, str(data), out)
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert "Traceback" not in r.output
    assert not out.exists() and not (tmp_path / "out.training").exists()


def test_a_folder_of_videos_trains(untrained, tmp_path):
    """Real-video data: NAME.mp4 + its clip + caption, the encoder and a LoRA on a frozen backbone."""
    data = tmp_path / "data"
    data.mkdir()
    _sample(data, "clip0", 12, 12)
    r = _train(untrained, str(data), tmp_path / "out", "--steps", "1")
    assert r.exit_code == 0, r.output
    assert load_checkpoint(tmp_path / "out").lora

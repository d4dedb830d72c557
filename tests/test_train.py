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


def _vae_state(ckpt):
    return {k: v.clone() for k, v in load_checkpoint(ckpt).vae.state_dict().items()}


@pytest.mark.slow  # about 20 s: four training runs
def test_vae_decoder_alone_keeps_the_latent_space(untrained, made_motion, tmp_path):
    """--train vae_decoder changes the decoder and nothing else (a UNet trained on the VAE's
    latents stays valid); --train vae alone trains the whole VAE and no diffusion module."""
    data = _render_spec(made_motion)
    start = _vae_state(untrained)
    r = CliRunner().invoke(main, ["train", "--ckpt", str(untrained), "--data", data, "--out", str(tmp_path / "d"),
                                  "--train", "vae_decoder", "--smoke", "--vae-figure-weight", "20"])
    assert r.exit_code == 0, r.output
    assert "after 2 VAE + 0 diffusion steps" in r.output
    dec = _vae_state(tmp_path / "d")
    changed = {k for k in start if not torch.equal(start[k], dec[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed), sorted(changed)[:5]
    assert any(k.startswith("decoder.") for k in changed)
    before, after = load_checkpoint(untrained), load_checkpoint(tmp_path / "d")
    for name in ("unet", "encoder", "text_encoder"):
        a, b = getattr(before, name).state_dict(), getattr(after, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    r = CliRunner().invoke(main, ["train", "--ckpt", str(untrained), "--data", data, "--out", str(tmp_path / "v"),
                                  "--train", "vae", "--smoke"])
    assert r.exit_code == 0, r.output
    whole = _vae_state(tmp_path / "v")
    assert any(k.startswith("encoder.") and not torch.equal(start[k], whole[k]) for k in start)
    # the VAE trained alone goes into another checkpoint's diffusion training
    r = _train(untrained, data, tmp_path / "u", "--vae-from", str(tmp_path / "v"))
    assert r.exit_code == 0, r.output
    swapped = load_checkpoint(tmp_path / "u")
    assert all(torch.equal(whole[k], v) for k, v in swapped.vae.state_dict().items())
    assert swapped.config.vae["scaling_factor"] == load_checkpoint(tmp_path / "v").config.vae["scaling_factor"]
    r = _train(untrained, data, tmp_path / "w", "--vae-from", str(tmp_path / "nothing"))
    assert r.exit_code == 2 and "nothing" in r.output and not (tmp_path / "w").exists()


def test_vae_from_a_vae_of_another_factor_moves_the_generator_to_its_latents(untrained, made_motion, tmp_path):
    """A factor-8 generator takes the factor-4 demo VAE: the heatmap encoder unshuffles by 4 (its
    first convolution made anew, the rest kept), the UNet's sample size follows, and it trains and
    generates 16x16 latents at 64x64."""
    eight = tmp_path / "eight"
    r = CliRunner().invoke(main, ["init", "--demo", "--untrained", "--vae-scale-factor", "8", str(eight)])
    assert r.exit_code == 0, r.output
    start = load_checkpoint(eight)
    assert start.config.vae_scale_factor == 8 and start.config.encoder.unshuffle == 8
    r = CliRunner().invoke(main, ["train", "--ckpt", str(eight), "--data", _render_spec(made_motion),
                                  "--out", str(tmp_path / "m"), "--train", "unet", "--smoke", "--vae-from", str(untrained)])
    assert r.exit_code == 0, r.output
    moved = load_checkpoint(tmp_path / "m")
    assert moved.config.vae_scale_factor == 4 and moved.config.encoder.unshuffle == 4
    assert moved.config.unet["sample_size"] == moved.config.height // 4
    before, after = start.encoder.state_dict(), moved.encoder.state_dict()
    assert after["conv_in.weight"].shape != before["conv_in.weight"].shape
    assert all(torch.equal(before[k], v) for k, v in after.items() if not k.startswith("conv_in."))
    from engine.load import load_model
    model = load_model(tmp_path / "m", "cpu")
    assert model.vae_scale_factor == 4
    heat = torch.zeros(1, model.config.encoder.num_joints, 64, 64)
    assert model.encode_pose(heat)[0].shape[-2:] == (16, 16)


@pytest.mark.parametrize("args, message", [
    (["--train", "vae,vae_decoder"], "not both"),
    (["--train", "vae", "--vae-steps", "0"], "--vae-steps 0"),
    (["--train", "vae", "--vae-steps", "3", "--vae-figure-weight", "-1"], "--vae-figure-weight -1"),
    (["--train", "vae", "--vae-steps", "3", "--vae-batch-size", "0"], "--vae-batch-size"),
])
def test_bad_vae_options_are_refused(untrained, made_motion, tmp_path, args, message):
    r = CliRunner().invoke(main, ["train", "--ckpt", str(untrained), "--data", _render_spec(made_motion),
                                  "--out", str(tmp_path / "x"), *args])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "x").exists()


def test_training_into_its_own_checkpoint_is_refused(untrained, made_motion, tmp_path, monkeypatch):
    """--out naming the --ckpt folder would replace the weights it trains from, even with --overwrite;
    refused before the data is read (a folder of videos is decoded first)."""
    import shutil

    import finephys.training.train_data

    monkeypatch.setattr(finephys.training.train_data, "open_source", lambda *a, **k: pytest.fail("data read first"))
    ck = tmp_path / "ck"
    shutil.copytree(untrained, ck)
    before = sorted((p.relative_to(ck), p.stat().st_mtime_ns) for p in ck.rglob("*"))
    for seed in ("0", "-1"):
        r = CliRunner().invoke(main, ["train", "--ckpt", str(ck), "--data", _render_spec(made_motion), "--out", str(ck),
                                      "--smoke", "--overwrite", "--seed", seed])
        said = "is the checkpoint folder itself" if seed == "0" else "'--seed': -1 is not in the range x>=0"
        assert r.exit_code == 2 and said in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert sorted((p.relative_to(ck), p.stat().st_mtime_ns) for p in ck.rglob("*")) == before


def test_figure_weights_follow_the_bones():
    """1 on a bone, falling with the distance from the skeleton, ~0 far from it."""
    from finephys.poses.layouts import H36M17
    from finephys.training.train import figure_weights

    kp = torch.full((1, 17, 2), 32.0)
    kp[0, :, 1] = torch.linspace(10, 50, 17)  # every joint on the vertical line x = 32
    w = figure_weights(kp, 64, 64)[0, 0]
    assert w.shape == (64, 64)
    a, b = H36M17.edges[0]
    mid = ((kp[0, a] + kp[0, b]) / 2).round().long()
    assert w[mid[1], mid[0]] > 0.99
    side = 40.0  # the skeleton's larger side; sigma = 0.08 x 40 = 3.2 px
    assert abs(float(w[30, 32 + 4]) - float(np.exp(-16 / (2 * (0.08 * side) ** 2)))) < 1e-4
    assert w[30, 5] < 1e-6 and w[62, 32] < 1e-3
    # a joint not found (score 0, its point left at the corner) adds no bone and no extent
    lost, scores = kp.clone(), torch.ones(1, 17)
    lost[0, 16], scores[0, 16] = torch.tensor([-0.5, -0.5]), 0.0
    w_lost = figure_weights(lost, 64, 64, scores=scores)[0, 0]
    assert w_lost[0, 0] < 1e-6 and figure_weights(lost, 64, 64)[0, 0, 0, 0] > 0.5
    side_seen = float(kp[0, 15, 1] - kp[0, 0, 1])  # the extent of the 16 joints found
    assert abs(float(w_lost[30, 36]) - float(np.exp(-16 / (2 * (0.08 * side_seen) ** 2)))) < 1e-4
    assert torch.equal(figure_weights(kp, 64, 64, scores=torch.ones(1, 17)), w[None, None])


def test_figure_weight_weighs_the_diffusion_loss_but_not_validation(untrained, made_motion, tmp_path):
    """--figure-weight changes the training loss of a batch and leaves the held-out noise MSE alike."""
    from pathlib import Path

    from finephys.model.text import load_tokenizer
    from finephys.training.train import GenTrainOptions, Trainer
    from finephys.training.train_data import open_source

    # 3 frames against 4 latent channels: weights laid out along the wrong axis would not broadcast
    source = open_source(_render_spec(made_motion), (64, 64), 8.0, 3, load_tokenizer(Path(untrained) / "tokenizer"))
    losses = {}
    for w in (0.0, 20.0):
        opts = GenTrainOptions(train=("encoder", "lora", "unet"), steps=1, batch_size=1, frames=3, height=64,
                               width=64, figure_weight=w)
        trainer = Trainer(untrained, source, tmp_path / f"w{w}", opts, device=torch.device("cpu"))
        rng, gen = trainer._rng(0, 1)
        batch = source.batch(rng, 1)
        with torch.no_grad():
            losses[w] = (float(trainer.diffusion_loss(batch, gen, np.random.default_rng(0))), trainer.validate(1))
    assert abs(losses[0.0][0] - losses[20.0][0]) > 1e-4 * losses[0.0][0]
    assert losses[0.0][1] == pytest.approx(losses[20.0][1], rel=1e-6)
    r = _train(untrained, _render_spec(made_motion), tmp_path / "x", "--figure-weight", "-1")
    assert r.exit_code == 2 and "--figure-weight -1" in r.output and not (tmp_path / "x").exists()
    r = _train(untrained, _render_spec(made_motion), tmp_path / "y", "--figure-weight", "20", "--steps", "1")
    assert r.exit_code == 0, r.output


def test_cosine_schedule_warms_up_then_falls_to_zero_at_steps_and_the_run_uses_it(untrained, made_motion, tmp_path,
                                                                                  monkeypatch):
    import finephys.training.train as train
    assert [train._lr(s, 4) for s in (0, 3, 50)] == [0.25, 1.0, 1.0]
    cos = [train._lr(s, 4, "cosine", 104) for s in range(110)]
    assert cos[:4] == [0.25, 0.5, 0.75, 1.0] and cos[54] == pytest.approx(0.5) and cos[104:] == [0.0] * 6
    assert all(a >= b for a, b in zip(cos[3:], cos[4:]))
    short = [train._lr(s, 200, "cosine", 8) for s in range(9)]  # a run under the warm-up still falls to 0
    assert short[:3] == [1 / 3, 2 / 3, 1.0] and short[8] == 0.0 and short[3] > short[7] > 0  # warm-up 8 // 4 + 1
    with pytest.raises(Exception, match="--lr-schedule linear"):
        train.GenTrainOptions(train=("encoder",), lr_schedule="linear").check()
    with pytest.raises(Exception, match=r"^--height 12: expected a positive multiple of 8$"):
        train.GenTrainOptions(train=("encoder",), height=12).check()
    with pytest.raises(Exception, match=r"^--frames 2: expected at least 3$"):
        train.GenTrainOptions(train=("encoder",), frames=2).check()
    seen = []
    monkeypatch.setattr(train, "_lr", lambda *a: seen.append(a) or 1.0)
    r = _train(untrained, _render_spec(made_motion), tmp_path / "out", "--steps", "3", "--lr-schedule", "cosine")
    assert r.exit_code == 0, r.output
    assert seen[-1] == (2, 200, "cosine", 3)


def test_resuming_a_cosine_run_keeps_its_steps_and_an_old_state_keeps_its_schedule(untrained, made_motion, tmp_path):
    """A cosine schedule ends at the run's --steps, so a resume may not move them; a state written
    before --lr-schedule existed ran at the constant rate, so resuming it as cosine is refused."""
    import json

    data = _render_spec(made_motion)
    r = _train(untrained, data, tmp_path / "c", "--steps", "2", "--lr-schedule", "cosine", "--time-limit", "1e-9")
    assert r.exit_code == 0, r.output
    r = _train(untrained, data, tmp_path / "c", "--steps", "4", "--lr-schedule", "cosine", "--resume")
    assert r.exit_code == 2 and "--steps 4, but the run" in r.output and "has 2" in r.output, r.output
    r = _train(untrained, data, tmp_path / "k", "--steps", "1", "--time-limit", "1e-9")
    assert r.exit_code == 0, r.output
    state = tmp_path / "k.training" / "state.json"
    info = json.loads(state.read_text())
    del info["options"]["lr_schedule"]  # as a state from before the option
    state.write_text(json.dumps(info))
    r = _train(untrained, data, tmp_path / "k", "--steps", "2", "--lr-schedule", "cosine", "--resume")
    assert r.exit_code == 2 and "lr_schedule" in r.output, r.output
    r = _train(untrained, data, tmp_path / "k", "--steps", "2", "--resume")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("args, message", [
    (["--lora-rank", "0"], "--lora-rank 0: expected >= 1"),
    (["--lora-rank", "8", "--train", "encoder,lora"], "already has a LoRA of rank"),
    (["--height", "4096", "--width", "4096", "--frames", "4"], "pixels per clip, expected at most"),
    (["--steps", "0"], "--steps: 0, expected >= 1"),
])
def test_training_options_that_were_ignored_or_crashed_are_refused(demo_ckpt, made_motion, tmp_path, args, message,
                                                                   monkeypatch):
    """--smoke keeps the options given (--steps 0 is refused, not made 2); a LoRA rank the
    checkpoint's LoRA does not have, and a clip no GPU holds, are refused before any work."""
    import finephys.training.train_data

    monkeypatch.setattr(finephys.training.train_data, "open_source", lambda *a, **k: pytest.fail("data read first"))
    r = CliRunner().invoke(main, ["train", "--ckpt", str(demo_ckpt), "--data", _render_spec(made_motion),
                                  "--out", str(tmp_path / "x"), "--smoke", *args])
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "x").exists()


def test_held_out_motion_that_is_also_trained_on_is_refused(untrained, made_motion, tmp_path):
    motion = made_motion / ".." / made_motion.name / "walk1.npz"  # one of the data folder's walks, spelled otherwise
    r = CliRunner().invoke(main, ["train", "--ckpt", str(untrained), "--data", _render_spec(made_motion),
                                  "--hold-out", str(motion), "--out", str(tmp_path / "x"), "--smoke"])
    assert r.exit_code == 2 and "is also in the training motion" in r.output, r.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, message", [
    (["--height", "0"], "--height 0: expected a positive multiple of 8"),
    (["--width", "0"], "--width 0: expected a positive multiple of 8"),
    (["--height", "-8"], "--height -8: expected a positive multiple of 8"),
    (["--frames", "0"], "--frames 0: expected at least 3"),
])
def test_a_zero_or_negative_size_is_refused_not_taken_as_the_default(demo_ckpt, made_motion, tmp_path, args,
                                                                     message, monkeypatch):
    """0 once read as "not given" (``height or cfg.height``) and trained at the model's size."""
    import finephys.training.train_data

    monkeypatch.setattr(finephys.training.train_data, "open_source", lambda *a, **k: pytest.fail("data read first"))
    r = CliRunner().invoke(main, ["train", "--ckpt", str(demo_ckpt), "--data", _render_spec(made_motion),
                                  "--out", str(tmp_path / "x"), "--smoke", *args])
    assert r.exit_code == 2 and r.output.strip() == f"error: {message}", r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.training").exists()

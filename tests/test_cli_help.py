"""What `--help` says, and click's own errors as one line (issue 23 item 18)."""
import re

import click
import pytest
from click.testing import CliRunner

from engine.cli.app import main
from engine.cli.detect import detect_options
from engine.options import OPTIONS


def help_text(*command: str) -> str:
    r = CliRunner().invoke(main, [*command, "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    return r.output


def sections(text: str) -> dict[str, list[str]]:
    """Help section heading -> the option flags listed under it, in order."""
    out, heading = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            heading = line[:-1]
            out[heading] = []
        elif heading and (m := re.match(r"  (--[\w-]+)", line)):
            out[heading].append(m.group(1))
    return out


def test_generate_help_lists_the_detection_options_under_video():
    detection = [o.opts[0] for o in detect_options(lambda: None).__click_params__][::-1]
    found = sections(help_text("generate"))
    headings = list(found)
    assert headings[:2] == ["Input (one of)", "With --video: pose detection (as `fpengine detect`)"], headings
    assert found[headings[0]] == ["--poses", "--video"]
    assert found[headings[1]] == [*detection, "--save-clip"]
    assert "--prompt" in found["Options"] and not set(detection) & set(found["Options"])


@pytest.mark.parametrize("command", ["generate", "check"])
def test_device_is_a_choice(command):
    text = " ".join(help_text(command).split())
    assert "--device [auto|cpu|cuda|cuda:N]" in text and "[default: auto]" in text.split("--device", 1)[1][:200]
    option = next(p for p in main.commands[command].params if p.name == "device")
    assert isinstance(option.type, click.Choice)
    for value in ("auto", "cpu", "cuda", "cuda:1"):
        assert option.type.convert(value, option, None) == value


def test_a_device_outside_the_choices_is_one_line(tmp_path):
    out = tmp_path / "v.mp4"
    r = CliRunner().invoke(main, ["generate", "--poses", "examples/walk.npz", "--prompt", "x", "--out", str(out),
                                  "--device", "gpu"])
    assert r.exit_code == 2 and r.output == ("error: Invalid value for '--device': 'gpu', expected auto, cpu, cuda "
                                             "or cuda:N\n"), r.output
    assert not out.exists()


def test_check_help_describes_its_backends():
    text = " ".join(help_text("check").split())
    backend = text.split("--backend [auto|onnxruntime|tensorrt|triton]", 1)[1].split("--seed", 1)[0]
    for words in ("against the reference", "onnxruntime (the ONNX graphs)", "tensorrt (the plans)", "triton (CUDA",
                  "auto: tensorrt where the engine has plans for this GPU, else triton on CUDA, else onnxruntime"):
        assert words in backend, backend


def test_serve_help_names_every_request_option():
    text = " ".join(help_text("serve").split())
    missing = [name for name in OPTIONS if not re.search(rf"\b{name}\b", text)]
    assert missing == []


@pytest.mark.parametrize("args, words", [
    (["generate", "--steps", "abc"], "Invalid value for '--steps': 'abc' is not a valid integer."),
    (["generate", "--backend", "fast"], "Invalid value for '--backend': 'fast' is not one of"),
    (["generate", "--no-such-option"], "No such option '--no-such-option'"),
    (["check", "--device", "tpu"], "Invalid value for '--device': 'tpu', expected auto, cpu, cuda or cuda:N"),
    (["export", "--out", "x"], "Missing option '--ckpt'"),
    (["no-such-command"], "No such command 'no-such-command'"),
])
def test_click_errors_are_one_line(args, words):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and r.output.startswith("error: ") and r.output.count("\n") == 1, r.output
    assert words in r.output

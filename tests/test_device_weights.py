"""``engine.device_weights``: safetensors files read in the background give the tensors
``safetensors.torch.load_file`` gives, each on a 16-byte boundary, in the order asked; a bad
file is reported to the caller of ``get``, naming it."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.device_weights import DeviceWeights


def _mixed(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "odd.half": torch.randn(3, generator=g).half(),  # 6 bytes: the next fp16 tensor starts off 16 bytes
        "next.half": torch.randn(5, 7, generator=g).half(),
        "ints": torch.arange(9, dtype=torch.int64),
        "floats": torch.randn(4, 3, 2, 2, generator=g),
        "flag": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }


def _check(got: dict, path, device: str) -> None:
    ref = load_file(str(path))
    assert sorted(got) == sorted(ref)
    for k, want in ref.items():
        t = got[k]
        assert t.device.type == device and t.dtype == want.dtype and t.shape == want.shape, k
        assert torch.equal(t.cpu(), want), k
        assert t.data_ptr() % 16 == 0, f"{k} starts off a 16-byte boundary"


def test_files_read_in_the_background_equal_load_file_and_start_aligned(tmp_path):
    paths = [tmp_path / f"w{i}.safetensors" for i in range(3)]
    for i, p in enumerate(paths):
        save_file(_mixed(i), str(p))
    reader = DeviceWeights(paths, torch.device("cpu"))
    assert paths[1] in reader and tmp_path / "other.safetensors" not in reader
    for p in reversed(paths):  # asked in any order
        _check(reader.get(p), p, "cpu")


def test_a_truncated_file_is_reported_to_the_caller_naming_it_and_later_files_still_load(tmp_path):
    bad, good = tmp_path / "bad.safetensors", tmp_path / "good.safetensors"
    save_file(_mixed(0), str(bad))
    save_file(_mixed(1), str(good))
    bad.write_bytes(bad.read_bytes()[:-10])
    reader = DeviceWeights([bad, good], torch.device("cpu"))
    with pytest.raises(ValueError, match="bad.safetensors: truncated"):
        reader.get(bad)
    _check(reader.get(good), good, "cpu")


def test_an_unknown_dtype_names_the_tensor(tmp_path):
    header = json.dumps({"x": {"dtype": "F8_E5M2", "shape": [2], "data_offsets": [0, 2]}}).encode()
    path = tmp_path / "f8.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    with pytest.raises(ValueError, match="tensor x has dtype F8_E5M2"):
        DeviceWeights([path], torch.device("cpu")).get(path)


@pytest.mark.gpu
def test_on_cuda_the_tensors_are_ready_on_the_current_stream(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    path = tmp_path / "big.safetensors"
    save_file({**_mixed(0), "big": torch.randn(3 << 20)}, str(path))
    reader = DeviceWeights([path], torch.device("cuda"), chunk=1 << 20)  # many chunks through the two buffers
    torch.cuda.current_stream().synchronize()
    _check(reader.get(path), path, "cuda")


def test_short_reads_are_read_on_until_the_end_of_the_file():
    """A raw file may return fewer bytes than asked before its end; the reader asks again."""
    import io

    from engine.device_weights import _read_exact

    class Trickle(io.RawIOBase):
        def __init__(self, data):
            self.data, self.pos = data, 0

        def readinto(self, view):
            n = min(3, len(view), len(self.data) - self.pos)
            view[:n] = self.data[self.pos:self.pos + n]
            self.pos += n
            return n

    buf = bytearray(10)
    assert _read_exact(Trickle(bytes(range(10))), memoryview(buf)) == 10 and bytes(buf) == bytes(range(10))
    assert _read_exact(Trickle(b"abcd"), memoryview(bytearray(10))) == 4  # the end of the file

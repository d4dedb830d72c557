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


@pytest.mark.parametrize("header,words", [
    (b"{not json", "its header is not JSON"),
    (b"[1, 2]", "its header is not a JSON object"),
    (b'{"x": {"shape": [2], "data_offsets": [0, 8]}}', "tensor x's entry"),
    (b'{"x": {"dtype": "F32", "shape": [2]}}', "tensor x's entry"),
])
def test_a_corrupt_header_is_one_line_of_bad_input_naming_the_file(tmp_path, header, words):
    from finephys.errors import InputError

    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(InputError, match=f"bad.safetensors: .*{words}"):
        DeviceWeights([path], torch.device("cpu")).get(path)


def test_a_tensor_whose_bytes_do_not_match_its_shape_names_it(tmp_path):
    header = json.dumps({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(ValueError, match="tensor x takes bytes 0..8, not the 12 of F32"):
        DeviceWeights([path], torch.device("cpu")).get(path)


def test_a_dropped_file_is_not_handed_out_and_a_closed_reader_stops_before_the_next_file(tmp_path, monkeypatch):
    import threading

    from engine import device_weights

    paths = [tmp_path / f"w{i}.safetensors" for i in range(3)]
    for i, p in enumerate(paths):
        save_file(_mixed(i), str(p))
    reader = DeviceWeights(paths, torch.device("cpu"))
    reader.drop(paths[1])
    assert paths[1] not in reader and paths[0] in reader
    with pytest.raises(KeyError, match="dropped"):
        reader.get(paths[1])
    _check(reader.get(paths[2]), paths[2], "cpu")

    gate, read = threading.Event(), device_weights.DeviceWeights._read
    monkeypatch.setattr(device_weights.DeviceWeights, "_read", lambda self, *a: gate.wait() and read(self, *a))
    reader = DeviceWeights(paths, torch.device("cpu"))
    closer = threading.Thread(target=reader.close)
    closer.start()
    while not reader._stop.is_set():
        pass
    gate.set()  # the first file is read to the end, the others not at all
    closer.join()
    _check(reader.get(paths[0]), paths[0], "cpu")
    for p in paths[1:]:
        with pytest.raises(device_weights.Stopped, match="not read"):
            reader.get(p)


@pytest.mark.gpu
def test_on_cuda_the_tensors_are_ready_on_the_current_stream(tmp_path, monkeypatch):
    """The copies are held back on the reader's stream (a long sleep queued before them): the
    tensors read right after get() must still be the file's, as get() makes the caller's stream
    wait for that stream."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from engine import device_weights

    read_exact = device_weights._read_exact

    def slow(fh, view):
        if len(view) > 8 << 10:  # a chunk of the data, not the header: on the reader's stream, before its copy
            torch.cuda._sleep(50_000_000)
        return read_exact(fh, view)

    monkeypatch.setattr(device_weights, "_read_exact", slow)
    path = tmp_path / "big.safetensors"
    save_file({**_mixed(0), "big": torch.randn(3 << 20)}, str(path))
    reader = DeviceWeights([path], torch.device("cuda"), chunk=1 << 20)  # many chunks through the two buffers
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

"""CLIP text side: the real CLIP BPE tokenizer, built offline, and prompt encoding.

The tokenizer is rebuilt from the BPE merges that the ``clip-anytorch`` package ships
(``clip/bpe_simple_vocab_16e6.txt.gz``, OpenAI's file): the vocabulary is the 256 byte symbols,
the same with ``</w>``, one entry per merge, then the two special tokens; 49408 entries, the
ordering of OpenAI's SimpleTokenizer and of every SD 1.5 ``tokenizer/vocab.json``. It is read by
``clip_bpe.ClipTokenizer``, in pure Python (importing transformers would cost seconds at start-up).
"""
from __future__ import annotations

import gzip
import importlib.metadata
import json
import logging
from pathlib import Path

import torch

from finephys.errors import InputError
from finephys.model.clip_bpe import ClipTokenizer, byte_alphabet

log = logging.getLogger(__name__)
MERGES_FILE = "clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2
MAX_LENGTH = 77


def _byte_symbols() -> list[str]:
    """The 256 byte symbols in vocabulary order: the printable ones (standing for themselves) in
    byte order, then the stand-ins of the others."""
    return sorted(byte_alphabet().values(), key=ord)


def _merges_path() -> Path:
    try:
        path = Path(importlib.metadata.distribution("clip-anytorch").locate_file(MERGES_FILE))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise InputError(
            "CLIP BPE merges not found: install them with `pip install --no-deps clip-anytorch==2.6.0`"
        )
    return path


def write_clip_tokenizer(folder: Path) -> None:
    """Write vocab.json, merges.txt and the tokenizer config of CLIP ViT-L/14 into ``folder``."""
    lines = gzip.open(_merges_path(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {
        "model_max_length": MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def load_tokenizer(folder: Path) -> ClipTokenizer:
    """The CLIP tokenizer of ``folder`` (vocab.json, merges.txt, tokenizer_config.json: an SD 1.5
    ``tokenizer/``); pure Python, the ids of transformers' CLIPTokenizer (see ``clip_bpe``)."""
    if not (Path(folder) / "vocab.json").is_file() or not (Path(folder) / "merges.txt").is_file():
        raise InputError(f"tokenizer folder {folder}: expected vocab.json and merges.txt")
    return ClipTokenizer.from_folder(Path(folder))


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def tokenize(tokenizer: ClipTokenizer, prompts: list[str]) -> torch.Tensor:
    """Prompts -> (N, 77) token ids, padded; over-long prompts are truncated with a warning."""
    for p in prompts:
        if not isinstance(p, str):
            raise InputError(f"prompt: expected text, got {type(p).__name__}")
    for p in dict.fromkeys(prompts):  # each distinct prompt once
        full = tokenizer.encode(p)
        if len(full) > MAX_LENGTH:
            removed = tokenizer.decode(full[MAX_LENGTH - 1 : -1])
            log.warning("A prompt (%r) is longer than %d CLIP tokens; %d tokens were cut: %r", _short(p), MAX_LENGTH,
                        len(full) - MAX_LENGTH, _short(removed, 60))
    ids = tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    return ids.input_ids.reshape(len(prompts), MAX_LENGTH)

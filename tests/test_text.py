import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from finephys.errors import InputError
from finephys.model.text import MAX_LENGTH, load_tokenizer, tokenize, write_clip_tokenizer

from .conftest import ROOT


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    write_clip_tokenizer(folder)
    return folder


def test_real_clip_bpe_ids(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert len(tok) == 49408
    # ids of OpenAI's CLIP tokenizer (the ones every SD 1.5 tokenizer/vocab.json holds)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = tokenize(tok, ["a photo", ""])
    assert ids.shape == (2, 77) and ids[1, 0] == 49406 and ids[1, 1] == 49407


def test_long_prompt_truncated_with_warning(tok_dir, caplog):
    tok = load_tokenizer(tok_dir)
    with caplog.at_level(logging.WARNING):
        ids = tokenize(tok, ["dance " * 100])
    assert ids.shape == (1, 77) and ids[0, -1] == 49407
    assert "is longer than 77 CLIP tokens; 25 tokens were cut: 'dance dance" in caplog.text
    assert max(len(rec.getMessage()) for rec in caplog.records) < 200  # was the whole cut text (9.7 kB for one prompt)


PROMPTS = [
    "a photo of a cat",
    "A Person WALKING forward, then JUMPING!!! (high quality), 4k, 8K, 1080p",
    "it's a man who's running; they're fine, we've seen, I'm here, you'll see, he'd go. Don't!",
    "3.14159 and 1,000,000 steps - 42nd street @ 10:30pm #tag $5 50% a+b=c",
    "café naïve résumé Zoë über straße",
    "cafe\u0301 (a combining accent)",
    "a dancer 😀 👍🏽 🇫🇷 🏃\u200d♂️ running",
    "Tom &amp; Jerry &lt;3 &quot;cartoon&quot;",
    "it’s “quoted” and ‘single’",
    "multiple    spaces\n\nand newlines\tand tabs\r\n  at the ends  ",
    "日本語のテキスト 中文 한국어 русский текст Ελληνικά",
    'a <|endoftext|> b <|startoftext|>c "<|endoftext|>", d',
    "e-mail@example.com http://x.y/z?q=1&r=2 C:\\path\\file.txt",
    "word " + " ".join(f"w{i}ord" for i in range(100)),  # a 100-word prompt: truncated
    "",
    "   ",
]


def test_ids_equal_transformers_clip_tokenizer(tok_dir):
    pytest.importorskip("transformers", reason="transformers is not installed: no reference CLIPTokenizer to compare with")
    import ftfy
    from transformers import CLIPTokenizer

    ours = load_tokenizer(tok_dir)
    ref = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    # We match the Python CLIPTokenizer of transformers 4 (use_fast=False), which cleans text with
    # ftfy.fix_text. transformers 5 only has the Rust-backed one (like 4's CLIPTokenizerFast): it
    # normalises with NFC instead, so it is given the text ftfy has fixed; everything after the
    # clean-up (whitespace, lower case, pre-tokenisation, byte mapping, BPE, specials) is compared.
    fix = (lambda p: p) if getattr(ref, "is_fast", True) is False else ftfy.fix_text
    for p in PROMPTS:
        assert ours(p).input_ids == ref(fix(p)).input_ids, p
        content = ours(p).input_ids[1:-1]
        assert ours.decode(content) == ref.decode(content), p
    batch = dict(padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    expected = ref([fix(p) for p in PROMPTS], **batch).input_ids
    assert torch.equal(ours(PROMPTS, **batch).input_ids, expected)
    assert torch.equal(tokenize(ours, PROMPTS), expected)
    # the clean-up itself: ids of transformers 4.57.3's CLIPTokenizer (ftfy 6.3)
    assert ours("Tom &amp; Jerry").input_ids == [49406, 2435, 261, 9164, 49407]
    assert ours("it’s").input_ids == ours("it's").input_ids == [49406, 585, 568, 49407]


def test_call_padding_truncation_and_decode(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert tok.model_max_length == 77 and tok.pad_token_id == tok.eos_token_id == 49407
    out = tok(["a cat", "a photo of a dog"], padding=True)
    assert out.input_ids == [[49406, 320, 2368, 49407, 49407, 49407, 49407],
                             [49406, 320, 1125, 539, 320, 1929, 49407]]
    assert out.attention_mask[0] == [1, 1, 1, 1, 0, 0, 0]
    long = tok("dance " * 100, max_length=10, truncation=True).input_ids
    assert len(long) == 10 and long[0] == 49406 and long[-1] == 49407
    assert len(tok("dance " * 100, verbose=False).input_ids) == 102
    t = tok("a cat", padding="max_length", return_tensors="pt").input_ids
    assert t.dtype == torch.long and t.shape == (1, 77)
    assert tok.decode(tok("A  Photo, of cafés!").input_ids[1:-1]) == "a photo , of cafés !"
    ids = tokenize(tok, ["a cat", "a cat", "a dog"])
    assert torch.equal(ids[0], ids[1]) and not torch.equal(ids[0], ids[2])
    assert tokenize(tok, []).shape == (0, 77)
    with pytest.raises(InputError, match="expected text"):
        tokenize(tok, ["a cat", 3])


def test_bad_tokenizer_folders(tok_dir, tmp_path):
    with pytest.raises(InputError, match="expected vocab.json and merges.txt"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0, ')
    (tmp_path / "merges.txt").write_bytes((tok_dir / "merges.txt").read_bytes())
    with pytest.raises(InputError, match="vocab.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_bytes((tok_dir / "vocab.json").read_bytes())
    (tmp_path / "merges.txt").write_text("#version: 0.2\ni n\nthree symbols here\n")
    with pytest.raises(InputError, match=r"merges.txt: line 3"):
        load_tokenizer(tmp_path)
    (tmp_path / "merges.txt").write_bytes(b"\xff\xfe broken")
    with pytest.raises(InputError, match="merges.txt"):
        load_tokenizer(tmp_path)
    (tmp_path / "merges.txt").write_bytes((tok_dir / "merges.txt").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text('{"pad_token": "<|nothing|>"}')
    with pytest.raises(InputError, match="pad_token"):
        load_tokenizer(tmp_path)


_FRESH = textwrap.dedent("""
    import sys
    from pathlib import Path
    from finephys.model.text import load_tokenizer, tokenize
    ids = tokenize(load_tokenizer(Path(sys.argv[1])), ["a photo of a cat"])
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407], ids
    print(sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "tokenizers")))
""")


def test_loading_imports_no_transformers(tok_dir):
    run = subprocess.run([sys.executable, "-c", _FRESH, str(tok_dir)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", run.stdout

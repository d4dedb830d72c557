"""CLIP's byte-level BPE tokenizer in plain Python, read from a tokenizer folder.

The folder is the one every SD 1.5 checkpoint has under ``tokenizer/`` (and the one
``text.write_clip_tokenizer`` writes): ``vocab.json``, ``merges.txt`` and, optionally,
``tokenizer_config.json`` / ``special_tokens_map.json``. The token ids are those of
transformers' Python ``CLIPTokenizer`` (``use_fast=False``, with ftfy installed), without importing
transformers, which costs seconds at start-up:

1. clean-up: ``ftfy.fix_text`` (repairs mojibake, unescapes HTML entities, straightens curly quotes),
   runs of whitespace collapsed to one space, ends stripped, lower case;
2. split into the two special tokens, the contractions 's 't 're 've 'm 'll 'd, runs of letters,
   single digits, and runs of other non-space characters;
3. each piece's UTF-8 bytes written with GPT-2's printable byte alphabet, ``</w>`` added to its last
   symbol, and adjacent symbols merged by merge rank (the lowest first) until no merge applies;
4. ``<|startoftext|>`` + ids + ``<|endoftext|>``; on request truncated (the end token kept last) and
   padded with the pad token.
"""
from __future__ import annotations

import json
import logging
import unicodedata
from pathlib import Path

import regex

from finephys.errors import InputError

log = logging.getLogger(__name__)
END_OF_WORD = "</w>"
DEFAULT_MAX_LENGTH = 77
_CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
# after the special tokens: contractions, letter runs, one digit, runs of anything else but spaces
_PIECES = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"
_SPACES = regex.compile(r"\s+")
_CACHE_SIZE = 20000


def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> character table: the printable Latin-1 bytes stand for themselves,
    the 68 others (controls, space, NBSP, soft hyphen) take chr(256), chr(257), ... in byte order."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, spare = {}, 256
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(spare)
            spare += 1
    return table


def _fix_text():
    try:
        import ftfy
    except ImportError:  # a declared dependency; without it, do what the Rust tokenizer does
        log.info("ftfy is not installed: CLIP prompts are only NFC-normalised before tokenisation")
        return lambda text: unicodedata.normalize("NFC", text)
    return ftfy.fix_text


class Encoded:
    """What ``ClipTokenizer.__call__`` returns: ``input_ids`` and ``attention_mask`` (lists or tensors)."""

    def __init__(self, input_ids, attention_mask):
        self.input_ids = input_ids
        self.attention_mask = attention_mask

    def __getitem__(self, key: str):
        return getattr(self, key)


class ClipTokenizer:
    """CLIP's BPE tokenizer: ``encode`` / ``decode``, and ``__call__`` as transformers' tokenizers."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], bos_token: str = _CLIP_SPECIALS[0],
                 eos_token: str = _CLIP_SPECIALS[1], pad_token: str = _CLIP_SPECIALS[1],
                 unk_token: str = _CLIP_SPECIALS[1], model_max_length: int = DEFAULT_MAX_LENGTH,
                 added: tuple[str, ...] = ()):
        self.vocab = vocab
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.model_max_length = model_max_length
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_token_id, self.eos_token_id = vocab[bos_token], vocab[eos_token]
        self.pad_token_id, self.unk_token_id = vocab[pad_token], vocab[unk_token]
        special = (bos_token, eos_token, pad_token, unk_token)
        self._special_ids = {vocab[s] for s in special}
        self._added_ids = {vocab[s] for s in added} - self._special_ids
        # the special and added tokens are cut out of the raw text first, as written, as transformers does
        marked = sorted({s for s in special + tuple(added) if s}, key=len, reverse=True)
        self._cut = regex.compile("(" + "|".join(regex.escape(s) for s in marked) + ")")
        # then, in the cleaned text, CLIP's own two (now also when they were written in upper case)
        self._clip_specials = {s: vocab[s] for s in _CLIP_SPECIALS if s in vocab}
        self._split = regex.compile("|".join(regex.escape(s) for s in _CLIP_SPECIALS) + "|" + _PIECES, regex.IGNORECASE)
        self._bytes = byte_alphabet()
        self._unbytes = {c: b for b, c in self._bytes.items()}
        self._fix = _fix_text()
        self._cache: dict[str, list[int]] = {}
        self._inverse: dict[int, str] | None = None
        self._warned_long = False

    @classmethod
    def from_folder(cls, folder: Path) -> "ClipTokenizer":
        """Read ``vocab.json`` and ``merges.txt``; the special tokens and ``model_max_length`` from
        ``tokenizer_config.json`` (and, as transformers does when that has no ``added_tokens_decoder``,
        ``special_tokens_map.json``); extra tokens from ``added_tokens.json`` / ``added_tokens_decoder``.
        ``do_lower_case`` is not read: CLIP's tokenizer lower-cases in any case, transformers' too."""
        folder = Path(folder)
        vocab = _read_vocab(folder / "vocab.json")
        merges = _read_merges(folder / "merges.txt", vocab)
        config = _read_json_object(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        added: dict[str, int] = {}
        if "added_tokens_decoder" in config:
            for i, token in (config["added_tokens_decoder"] or {}).items():
                content = token.get("content") if isinstance(token, dict) else token
                if not isinstance(content, str) or not str(i).isdigit():
                    raise InputError(f"{folder / 'tokenizer_config.json'}: added_tokens_decoder entry {i!r}: {token!r}")
                added[content] = int(i)
        else:
            if (folder / "special_tokens_map.json").is_file():
                config.update(_read_json_object(folder / "special_tokens_map.json"))
            if (folder / "added_tokens.json").is_file():
                for content, i in _read_json_object(folder / "added_tokens.json").items():
                    if isinstance(i, bool) or not isinstance(i, int):
                        raise InputError(f"{folder / 'added_tokens.json'}: token {content!r} has id {i!r}")
                    added[content] = i
        vocab = {**vocab, **added}
        kw = {}
        for key, default in (("bos_token", _CLIP_SPECIALS[0]), ("eos_token", _CLIP_SPECIALS[1]),
                             ("pad_token", _CLIP_SPECIALS[1]), ("unk_token", _CLIP_SPECIALS[1])):
            value = config.get(key, default)
            if isinstance(value, dict):  # {"__type": "AddedToken", "content": ...}
                value = value.get("content")
            if not isinstance(value, str) or value not in vocab:
                raise InputError(f"{folder}: the {key} {value!r} is not in vocab.json")
            kw[key] = value
        length = config.get("model_max_length", DEFAULT_MAX_LENGTH)
        if isinstance(length, bool) or not isinstance(length, (int, float)) or length < 2:
            raise InputError(f"{folder}: model_max_length {length!r} of the tokenizer config, expected an integer >= 2")
        # transformers writes ~1e30 for "no limit"; CLIP's text encoder has 77 positions
        kw["model_max_length"] = int(length) if length <= 1_000_000 else DEFAULT_MAX_LENGTH
        return cls(vocab, merges, added=tuple(added), **kw)

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def clean(self, text: str) -> str:
        return _SPACES.sub(" ", self._fix(text)).strip().lower()

    def encode(self, text: str) -> list[int]:
        """``text`` -> bos, its token ids, eos (not truncated)."""
        ids = [self.bos_token_id]
        for k, chunk in enumerate(self._cut.split(text)):
            if k % 2:  # a special token
                ids.append(self.vocab[chunk])
                continue
            for piece in self._split.findall(self.clean(chunk)):
                special = self._clip_specials.get(piece)
                ids.extend([special] if special is not None else self._word_ids(piece))
        ids.append(self.eos_token_id)
        return ids

    def _word_ids(self, piece: str) -> list[int]:
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        word = "".join(self._bytes[b] for b in piece.encode("utf-8"))
        symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
        ranks = self.ranks
        while len(symbols) > 1:
            best = None
            for pair in zip(symbols, symbols[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best is None or rank < best[0]):
                    best = (rank, pair)
            if best is None:
                break
            first, second = best[1]
            merged, i = [], 0
            while i < len(symbols):  # every occurrence of the pair, left to right, without overlap
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = [self.vocab.get(s, self.unk_token_id) for s in symbols]
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Token ids -> text: the tokens' bytes joined, each ``</w>`` a space, the ends stripped; an
        added (non-special) token stands apart, one space either side (as in transformers)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if self._inverse is None:
            self._inverse = {i: tok for tok, i in self.vocab.items()}
        skip = self._special_ids if skip_special_tokens else set()
        parts, run = [], []
        for i in map(int, ids):
            if i in self._added_ids:
                parts.append(self._text(run))
                parts.append(self._inverse[i])
                run = []
            elif i not in skip:
                run.append(self._inverse.get(i, ""))
        parts.append(self._text(run))
        return " ".join(p for p in parts if p)

    def _text(self, tokens: list[str]) -> str:
        data = bytes(self._unbytes[c] for c in "".join(tokens) if c in self._unbytes)
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def __call__(self, text, padding=False, max_length: int | None = None, truncation=False,
                 return_tensors: str | None = None, verbose: bool = True) -> Encoded:
        """transformers' calling convention, the parts of it this project uses: ``text`` is one string
        or a list; ``padding`` False / "longest" (or True) / "max_length"; ``truncation`` keeps the end
        token last; ``return_tensors="pt"`` gives (N, L) int64 tensors."""
        texts = [text] if isinstance(text, str) else list(text)
        limit = self.model_max_length if max_length is None else int(max_length)
        truncate = truncation not in (False, None, "do_not_truncate")
        if truncate and limit < 2:
            raise ValueError(f"max_length {limit}: a CLIP sequence needs at least its two special tokens")
        rows = []
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"text: expected str, got {type(t).__name__}")
            ids = self.encode(t)
            if truncate and len(ids) > limit:
                ids = ids[: limit - 1] + [self.eos_token_id]
            elif verbose and len(ids) > self.model_max_length and not self._warned_long:
                self._warned_long = True
                log.warning("Token indices sequence length is longer than the specified maximum sequence length "
                            "for this model (%d > %d)", len(ids), self.model_max_length)
            rows.append(ids)
        if padding == "max_length":
            width = limit
        elif padding in (True, "longest"):
            width = max((len(r) for r in rows), default=0)
        elif padding in (False, None, "do_not_pad"):
            width = 0
        else:
            raise ValueError(f"padding {padding!r}: expected False, True, 'longest' or 'max_length'")
        masks = [[1] * len(r) + [0] * max(0, width - len(r)) for r in rows]
        rows = [r + [self.pad_token_id] * max(0, width - len(r)) for r in rows]
        if return_tensors == "pt":
            import torch

            if len({len(r) for r in rows}) > 1:
                raise ValueError("return_tensors='pt' needs rows of one length: pass padding (and truncation)")
            return Encoded(torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long))
        if return_tensors is not None:
            raise ValueError(f"return_tensors {return_tensors!r}: only 'pt' is supported")
        if isinstance(text, str):
            return Encoded(rows[0], masks[0])
        return Encoded(rows, masks)


def _read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_vocab(path: Path) -> dict[str, int]:
    vocab = _read_json_object(path)
    for token, i in vocab.items():
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise InputError(f"{path}: token {token!r} has id {i!r}, expected an integer >= 0")
    return vocab


def _read_merges(path: Path, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """merges.txt: an optional ``#version`` line, then one ``left right`` pair a line, best first."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not readable as UTF-8 text ({e})") from None
    merges = []
    for n, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line or (n == 1 and line.startswith("#version")):
            continue
        pair = tuple(line.split(" "))
        if len(pair) != 2 or not pair[0] or not pair[1]:
            raise InputError(f"{path}: line {n} {line[:60]!r}, expected two symbols separated by one space")
        if pair[0] + pair[1] not in vocab:
            raise InputError(f"{path}: line {n}: the merged symbol {pair[0] + pair[1]!r} is not in vocab.json")
        merges.append(pair)
    if not merges:
        raise InputError(f"{path}: no merges")
    return merges

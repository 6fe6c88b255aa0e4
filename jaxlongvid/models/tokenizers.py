"""Tokenizers in pure Python (nothing is fetched): CLIP byte-level BPE and a word-level one for the tiny model.

Common interface: ``encode(list_of_str) -> np.int32 [B, context_length]`` (BOS, the tokens, EOS, then padding;
over-long prompts keep BOS + the first ``context_length - 2`` tokens + EOS), ``save(dir)``, ``Class.load(dir)``.
``load_tokenizer(path)`` picks the kind from the small ``jaxlongvid_tokenizer.json`` that ``save`` writes, and also
opens an HF ``tokenizer/`` folder, a umT5 ``tokenizer.json`` folder or an OpenCLIP ``bpe_simple_vocab_16e6.txt.gz``
directly. ``UMT5Tokenizer`` (Wan's text encoder) is the one exception to "pure Python": it runs the released
SentencePiece Unigram model through the ``tokenizers`` library, and its ``encode`` returns ``(ids, mask)``.

``CLIPTokenizer`` reproduces both CLIP front ends, which differ only in text cleaning, special-token names and
padding:

* HF ``CLIPTokenizer`` (``clean="hf"``): its special tokens (BOS, EOS, pad, unk) are cut out of the raw text first
  (so with SD 2.x's pad token ``!`` each ``!`` becomes id 0, as in transformers), then NFC, runs of whitespace ->
  one space, lower case; pads with the folder's pad token (SD 1.x: ``<|endoftext|>``, SD 2.x: ``!``);
* open_clip ``SimpleTokenizer`` (``clean="openclip"``): ``ftfy.fix_text`` when ftfy is installed (else NFC, which is
  what fix_text amounts to on ordinary text), HTML entities unescaped twice, whitespace collapsed, lower case; pads
  with 0.

Both then split words with CLIP's pattern (special tokens, the contractions 's 't 're 've 'm 'll 'd, runs of
letters, single digits, runs of other non-space characters), map each UTF-8 byte to a printable character
(the GPT-2 byte table), and merge symbol pairs by rank, the last symbol of a word carrying ``</w>``.
"""

from __future__ import annotations

import gzip
import html
import json
import os
import re
import unicodedata
import warnings
from typing import Iterable, Sequence

import numpy as np

CONFIG_NAME = "jaxlongvid_tokenizer.json"
OPENCLIP_NUM_MERGES = 49152 - 256 - 2  # open_clip reads this many merge lines (vocab 49408 with the specials)
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character: printable Latin-1 bytes map to themselves, the other 68 bytes to 256, 257, ...
    in byte order (so no byte becomes whitespace or a control character). The dict lists the printable bytes
    first: that order is the order of the first 256 vocabulary entries."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _is_letter(ch: str) -> bool:
    return unicodedata.category(ch)[0] == "L"


def _is_number(ch: str) -> bool:
    return unicodedata.category(ch)[0] == "N"


def split_words(text: str, specials: Sequence[str] = ()) -> list[str]:
    """CLIP's pre-tokenizer pattern, alternatives tried in order at each position:
    ``special|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+``; whitespace separates and is dropped."""
    words, i, n = [], 0, len(text)
    while i < n:
        fixed = next((s for s in (*specials, *CONTRACTIONS) if text.startswith(s, i)), None)
        if fixed is not None:
            j = i + len(fixed)
        elif _is_letter(text[i]):
            j = i + 1
            while j < n and _is_letter(text[j]):
                j += 1
        elif _is_number(text[i]):
            j = i + 1
        elif text[i].isspace():
            i += 1
            continue
        else:
            j = i + 1
            while j < n and not (text[j].isspace() or _is_letter(text[j]) or _is_number(text[j])):
                j += 1
        words.append(text[i:j])
        i = j
    return words


def _fix_text(text: str) -> str:
    try:
        import ftfy
    except ImportError:
        return unicodedata.normalize("NFC", text)
    return ftfy.fix_text(text)


def clean_text(text: str, style: str) -> str:
    if style == "hf":
        return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()
    if style == "openclip":
        text = html.unescape(html.unescape(_fix_text(text)))
        return " ".join(text.split()).lower()
    raise ValueError(f"unknown text cleaning {style!r}; expected 'hf' or 'openclip'")


def _pad_batch(rows: Iterable[list[int]], bos: int, eos: int, pad: int, length: int) -> np.ndarray:
    rows = list(rows)
    out = np.full((len(rows), length), pad, np.int32)
    for r, ids in enumerate(rows):
        seq = [bos, *ids[: length - 2], eos]
        out[r, : len(seq)] = seq
    return out


def _as_list(texts) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def _special_token(value) -> str | None:
    """A special token as HF configs store it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class CLIPTokenizer:
    """CLIP byte-level BPE over a vocabulary and a ranked merge list (see the module docstring)."""

    kind = "clip_bpe"

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *, bos_token: str,
                 eos_token: str, pad_id: int, unk_id: int | None = None, context_length: int = 77,
                 clean: str = "hf"):
        missing = [t for t in (bos_token, eos_token) if t not in vocab]
        if missing:
            raise ValueError(f"CLIPTokenizer: special tokens {missing} are not in the vocabulary")
        if context_length < 2:
            raise ValueError(f"CLIPTokenizer: context_length must be >= 2, got {context_length}")
        clean_text("", clean)  # validates the style
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.ranks = {m: r for r, m in enumerate(self.merges)}
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id, self.eos_id = vocab[bos_token], vocab[eos_token]
        self.pad_id = int(pad_id)
        self.unk_id = self.eos_id if unk_id is None else int(unk_id)
        self.context_length = int(context_length)
        self.clean = clean
        self.byte_table = bytes_to_unicode()
        self.raw_specials = self._raw_special_tokens()
        self._cache: dict[str, list[str]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    # -- constructors --
    @classmethod
    def from_hf_dir(cls, folder: str, context_length: int | None = None) -> "CLIPTokenizer":
        """An HF ``tokenizer/`` folder: ``vocab.json``, ``merges.txt`` and (optionally) ``special_tokens_map.json``
        / ``tokenizer_config.json`` for the special tokens and ``model_max_length``."""
        paths = {name: os.path.join(folder, name) for name in ("vocab.json", "merges.txt")}
        missing = [n for n, p in paths.items() if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{folder}: not an HF CLIP tokenizer folder, missing {missing}")
        with open(paths["vocab.json"], encoding="utf-8") as f:
            vocab = json.load(f)
        with open(paths["merges.txt"], encoding="utf-8") as f:
            merges = _parse_merges(f.read().split("\n"))
        settings = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the later file wins
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    settings.update(json.load(f))
        bos = _special_token(settings.get("bos_token")) or "<|startoftext|>"
        eos = _special_token(settings.get("eos_token")) or "<|endoftext|>"
        pad = _special_token(settings.get("pad_token")) or eos
        unk = _special_token(settings.get("unk_token")) or eos
        for label, tok in (("pad", pad), ("unk", unk)):
            if tok not in vocab:
                raise ValueError(f"{folder}: {label} token {tok!r} is not in vocab.json")
        if context_length is None:
            max_len = settings.get("model_max_length", 77)
            context_length = int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e6 else 77
        return cls(vocab, merges, bos_token=bos, eos_token=eos, pad_id=vocab[pad], unk_id=vocab[unk],
                   context_length=context_length, clean="hf")

    @classmethod
    def from_openclip_bpe(cls, path: str, context_length: int = 77) -> "CLIPTokenizer":
        """open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (a header line, then merges): the vocabulary is the 256 byte
        symbols, the same with ``</w>``, one entry per merge, then ``<start_of_text>``, ``<end_of_text>``."""
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = _parse_merges(lines[1: 1 + OPENCLIP_NUM_MERGES], header=False)
        symbols = list(bytes_to_unicode().values())
        tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        tokens += ["<start_of_text>", "<end_of_text>"]
        vocab = {t: i for i, t in enumerate(tokens)}
        return cls(vocab, merges, bos_token="<start_of_text>", eos_token="<end_of_text>", pad_id=0,
                   context_length=context_length, clean="openclip")

    # -- tokenizing --
    def _bpe(self, word: str) -> list[str]:
        if word in self._cache:
            return self._cache[word]
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[word] = symbols
        return symbols

    def _raw_special_tokens(self) -> list[str]:
        """HF matches its special tokens (BOS, EOS, pad, unk) in the raw text before anything else, so with
        SD 2.x's pad token ``!`` every ``!`` is cut out as id 0. open_clip only knows its two in its word pattern."""
        if self.clean != "hf":
            return []
        names = {i: t for t, i in self.vocab.items()}
        tokens = {names[i] for i in (self.bos_id, self.eos_id, self.pad_id, self.unk_id) if i in names}
        return sorted(tokens, key=len, reverse=True)  # longest first, as HF's trie matches

    def _split_specials(self, text: str) -> list[str]:
        """``text`` cut into special tokens and the pieces between them."""
        specials = self.raw_specials
        pieces, start, i = [], 0, 0
        while i < len(text):
            hit = next((t for t in specials if text.startswith(t, i)), None)
            if hit is None:
                i += 1
                continue
            pieces += [text[start:i], hit]
            i = start = i + len(hit)
        return pieces + [text[start:]]

    def tokenize(self, text: str) -> list[int]:
        """Token ids of one text, without BOS/EOS or padding."""
        specials = set(self.raw_specials)
        inline = (self.bos_token, self.eos_token)
        ids = []
        for piece in self._split_specials(text):
            if piece in specials:
                ids.append(self.vocab[piece])
                continue
            for word in split_words(clean_text(piece, self.clean), inline):
                if word in inline:
                    ids.append(self.vocab[word])
                    continue
                mapped = "".join(self.byte_table[b] for b in word.encode("utf-8"))
                ids.extend(self.vocab.get(s, self.unk_id) for s in self._bpe(mapped))
        return ids

    def encode(self, texts) -> np.ndarray:
        return _pad_batch((self.tokenize(t) for t in _as_list(texts)), self.bos_id, self.eos_id, self.pad_id,
                          self.context_length)

    # -- files --
    def save(self, folder: str) -> None:
        """``vocab.json`` + ``merges.txt`` (HF format) and ``jaxlongvid_tokenizer.json``."""
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, ensure_ascii=False)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))
        settings = dict(kind=self.kind, bos_token=self.bos_token, eos_token=self.eos_token, pad_id=self.pad_id,
                        unk_id=self.unk_id, context_length=self.context_length, clean=self.clean)
        with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=1)

    @classmethod
    def load(cls, folder: str) -> "CLIPTokenizer":
        settings = _read_settings(folder, cls.kind)
        with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
            merges = _parse_merges(f.read().split("\n"))
        return cls(vocab, merges, **settings)


def _parse_merges(lines: Sequence[str], header: bool = True) -> list[tuple[str, str]]:
    """``"a b"`` lines -> pairs; skips HF's ``#version`` header and blank lines."""
    merges = []
    for line in lines:
        if not line.strip() or (header and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"bad merge line {line!r}: expected two symbols")
        merges.append((parts[0], parts[1]))
    return merges


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary (the bundled tiny model): lower case, words are runs of letters
    and digits, unknown words -> ``<unk>``. Ids: 0 ``<pad>``, 1 ``<unk>``, 2 ``<bos>``, 3 ``<eos>``, then the words."""

    kind = "word"
    SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3

    def __init__(self, words: Sequence[str], context_length: int = 16):
        words = list(words)
        bad = [w for w in words if w != w.lower() or self.split(w) != [w]]
        dupes = sorted({w for w in words if words.count(w) > 1})
        if bad or dupes:
            raise ValueError(f"WordTokenizer: vocabulary words must be distinct lower-case letter/digit runs; "
                             f"bad {bad[:10]}, duplicated {dupes[:10]}")
        if context_length < 2:
            raise ValueError(f"WordTokenizer: context_length must be >= 2, got {context_length}")
        self.words = words
        self.context_length = int(context_length)
        self.ids = {w: i for i, w in enumerate(self.SPECIALS + tuple(words))}

    @staticmethod
    def split(text: str) -> list[str]:
        return re.findall(r"[^\W_]+", text.lower())

    @classmethod
    def from_texts(cls, texts: Iterable[str], context_length: int = 16) -> "WordTokenizer":
        """The sorted set of words in ``texts`` as the vocabulary."""
        return cls(sorted({w for t in texts for w in cls.split(t)}), context_length)

    @property
    def vocab_size(self) -> int:
        return len(self.ids)

    def tokenize(self, text: str) -> list[int]:
        return [self.ids.get(w, self.unk_id) for w in self.split(text)]

    def encode(self, texts) -> np.ndarray:
        """Ids ``[B, context_length]``; a prompt with words outside the vocabulary (read as ``<unk>``) or longer
        than ``context_length - 2`` words (cut) gets a warning saying so (:meth:`problems`)."""
        texts = _as_list(texts)
        for text in texts:
            for problem in self.problems(text):
                warnings.warn(problem, stacklevel=2)
        return _pad_batch((self.tokenize(t) for t in texts), self.bos_id, self.eos_id, self.pad_id,
                          self.context_length)

    def problems(self, text: str) -> list[str]:
        """What the model will not read of ``text``: unknown words, and words past the context length."""
        words, found = self.split(text), []
        unknown = sorted({w for w in words if w not in self.ids})
        if unknown:
            found.append(f"prompt {text!r}: the model does not know {', '.join(unknown)} (read as <unk>); its "
                         f"vocabulary: {' '.join(self.words)}")
        keep = self.context_length - 2
        if len(words) > keep:
            found.append(f"prompt {text!r}: {len(words)} words, the model reads the first {keep} (cut: "
                         f"{' '.join(words[keep:])})")
        return found

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(dict(kind=self.kind, context_length=self.context_length, words=self.words), f, indent=1)

    @classmethod
    def load(cls, folder: str) -> "WordTokenizer":
        return cls(**_read_settings(folder, cls.kind))


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ``ftfy.fix_text`` (NFC when ftfy is not installed), HTML entities unescaped twice,
    whitespace runs collapsed to one space, ends stripped (no lower-casing)."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(_fix_text(text)))).strip()


class UMT5Tokenizer:
    """The released umT5 tokenizer (``tokenizer.json``, a SentencePiece Unigram model) run by the ``tokenizers``
    library. ``encode(prompts) -> (ids int32 [B, text_len], mask bool [B, text_len])``: the cleaned prompt's
    pieces, truncated to ``text_len - 1``, then ``</s>``, then ``<pad>`` -- what transformers' T5 tokenizer gives
    with ``padding="max_length", truncation=True``."""

    kind = "umt5"

    def __init__(self, tokenizer, text_len: int = 512, clean: bool = True):
        self.tokenizer, self.text_len, self.clean = tokenizer, text_len, clean
        self.eos_id = self._special("</s>")
        self.pad_id = self._special("<pad>")

    def _special(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"UMT5Tokenizer: the tokenizer has no {token!r} token")
        return token_id

    @classmethod
    def from_dir(cls, folder: str, text_len: int = 512, clean: bool = True) -> "UMT5Tokenizer":
        """A tokenizer folder holding ``tokenizer.json`` (google/umt5-xxl's, or Wan's ``tokenizer/`` folder)."""
        try:
            from tokenizers import Tokenizer  # only Wan pipelines need it: the "wan" extra
        except ImportError:
            raise ImportError("Wan2.1's umT5 tokenizer needs the tokenizers library: pip install 'jaxlongvid[wan]'") \
                from None
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder}: no tokenizer.json (expected a umT5 tokenizer folder)")
        return cls(Tokenizer.from_file(path), text_len, clean)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def tokenize(self, text: str) -> list[int]:
        text = clean_prompt(text) if self.clean else text
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ids[: self.text_len - 1] + [self.eos_id]

    def encode(self, texts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = np.full((len(texts), self.text_len), self.pad_id, np.int32)
        mask = np.zeros((len(texts), self.text_len), bool)
        for row, text in enumerate(texts):
            tokens = self.tokenize(text)
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = True
        return ids, mask

    def save(self, folder: str) -> None:
        """``tokenizer.json`` as released and ``jaxlongvid_tokenizer.json`` (kind, text_len, clean)."""
        os.makedirs(folder, exist_ok=True)
        self.tokenizer.save(os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(dict(kind=self.kind, text_len=self.text_len, clean=self.clean), f, indent=1)

    @classmethod
    def load(cls, folder: str) -> "UMT5Tokenizer":
        return cls.from_dir(folder, **_read_settings(folder, cls.kind))


def _read_settings(folder: str, kind: str) -> dict:
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME}")
    with open(path, encoding="utf-8") as f:
        settings = json.load(f)
    if settings.pop("kind", None) != kind:
        raise ValueError(f"{path}: not a {kind!r} tokenizer")
    return settings


TOKENIZERS = {CLIPTokenizer.kind: CLIPTokenizer, WordTokenizer.kind: WordTokenizer, UMT5Tokenizer.kind: UMT5Tokenizer}


def load_tokenizer(path: str):
    """A tokenizer saved by ``save`` (kind read from ``jaxlongvid_tokenizer.json``), an HF ``tokenizer/`` folder
    (``vocab.json`` + ``merges.txt``), or an OpenCLIP ``bpe_simple_vocab_16e6.txt.gz`` file."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as f:
            kind = json.load(f).get("kind")
        if kind not in TOKENIZERS:
            raise ValueError(f"{path}: unknown tokenizer kind {kind!r}; known: {sorted(TOKENIZERS)}")
        return TOKENIZERS[kind].load(path)
    if os.path.isfile(os.path.join(path, "vocab.json")) and os.path.isfile(os.path.join(path, "merges.txt")):
        return CLIPTokenizer.from_hf_dir(path)
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return UMT5Tokenizer.from_dir(path)
    if os.path.isfile(path) and path.endswith((".txt.gz", ".txt")):
        return CLIPTokenizer.from_openclip_bpe(path)
    raise FileNotFoundError(f"{path}: no tokenizer here (expected {CONFIG_NAME}, an HF vocab.json + merges.txt "
                            f"folder, a umT5 tokenizer.json folder, or an OpenCLIP bpe_simple_vocab_16e6.txt.gz)")

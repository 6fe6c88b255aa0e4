"""Tokenizers: CLIP BPE against transformers' ``CLIPTokenizer`` and open_clip's stored ids; the word tokenizer.

* A small vocabulary / merge list is trained in the test (plain BPE on a few sentences) and written as an HF
  ``tokenizer/`` folder; ids must equal ``transformers.CLIPTokenizer`` (``padding="max_length"``,
  ``truncation=True``, 77) exactly, for SD1-style (pad = ``<|endoftext|>``) and SD2-style (pad = ``!``) folders
  (transformers cuts every special token, so also each ``!`` of "quality!!", out of the raw text first).
* With the real OpenCLIP merge list (``tests/fixtures/openclip_text_tiny/bpe_simple_vocab_16e6.txt.gz``): the ids
  open_clip's ``SimpleTokenizer`` produced for the fixture prompts, and transformers on the same vocabulary for
  harder text (accents, CJK, emoji, digits, contractions, truncation).
"""

import collections
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import CLIPTokenizer as HFCLIPTokenizer

from jaxlongvid.models.tokenizers import (CLIPTokenizer, WordTokenizer, bytes_to_unicode, load_tokenizer,
                                          split_words)

FIXTURE = Path(__file__).parent / "fixtures" / "openclip_text_tiny"
OPENCLIP_BPE = FIXTURE / "bpe_simple_vocab_16e6.txt.gz"

PROMPTS = [
    "a red circle bouncing on a striped background",
    "An astronaut riding a horse, 4k, HIGH quality!!",
    "",
    "  Café déjà vu, naïve façade  ",
    "don't stop: it's 12:30pm... we've 3.14 pies",
    "tabs\tand\nnewlines   and   spaces",
    "a_b-c/d\\e'f\"g (h) [i]",
    "a blue square sliding left, then right " * 12,  # longer than 77 tokens: truncated
]
HARD_PROMPTS = PROMPTS + ["emoji 🙂🚀 test", "日本語のテキスト and ñandú", "ÄÖÜ ẞ İstanbul", "!!'s 'S'LL",
                          "<|endoftext|> inside", "x" * 300]


def _train_bpe(texts, num_merges):
    """Plain BPE on CLIP's word split: repeatedly merge the most frequent adjacent pair (ties: smallest pair)."""
    table = bytes_to_unicode()
    words = collections.Counter()
    for t in texts:
        for w in split_words(t.lower()):
            mapped = "".join(table[b] for b in w.encode("utf-8"))
            words[tuple(mapped[:-1]) + (mapped[-1] + "</w>",)] += 1
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for w, count in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        new_words = collections.Counter()
        for w, count in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += count
        words = new_words
    return merges


def _write_hf_folder(folder: Path, merges, special_tokens_map=None):
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    if special_tokens_map:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
    return folder


def _hf_ids(folder, prompts):
    hf = HFCLIPTokenizer.from_pretrained(str(folder))
    return np.array(hf(prompts, padding="max_length", max_length=77, truncation=True).input_ids)


@pytest.fixture(scope="module")
def small_merges():
    corpus = ["a red circle bouncing on a striped background", "an astronaut riding a horse in high quality",
              "the quick brown fox jumps over the lazy dog", "squares and circles sliding left and right"] * 3
    return _train_bpe(corpus, 150)


@pytest.mark.parametrize("pad_token", [None, "!"])
def test_clip_bpe_matches_transformers_small_vocab(small_merges, pad_token, tmp_path):
    folder = _write_hf_folder(tmp_path / "tokenizer", small_merges,
                              {"pad_token": pad_token} if pad_token else None)
    ours = CLIPTokenizer.from_hf_dir(str(folder))
    got = ours.encode(PROMPTS)
    assert got.dtype == np.int32 and got.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(got, _hf_ids(folder, PROMPTS))
    assert ours.pad_id == (ours.vocab["!"] if pad_token else ours.vocab["<|endoftext|>"])
    assert (got[2, 2:] == ours.pad_id).all()  # "" -> BOS, EOS, padding
    assert got[-1, -1] == ours.eos_id and (got[-1, :-1] != ours.pad_id).all()  # truncated: EOS kept last


@pytest.fixture(scope="module")
def openclip_tokenizer():
    # the full OpenCLIP vocabulary ships with the fixtures (tests/fixtures/openclip_text_tiny): a missing file fails
    return CLIPTokenizer.from_openclip_bpe(str(OPENCLIP_BPE))


def test_openclip_bpe_reproduces_fixture_ids(openclip_tokenizer):
    config = json.loads((FIXTURE / "config.json").read_text())
    want = np.load(FIXTURE / "io.npz")["token_ids"]
    assert openclip_tokenizer.vocab_size == 49408
    assert (openclip_tokenizer.bos_id, openclip_tokenizer.eos_id, openclip_tokenizer.pad_id) == (49406, 49407, 0)
    np.testing.assert_array_equal(openclip_tokenizer.encode(config["prompts"]), want)


def test_full_vocab_matches_transformers(openclip_tokenizer, tmp_path):
    """The same 49408 tokens written as an HF folder (as in openai/clip-vit-large-patch14)."""
    hf_names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    vocab = {hf_names.get(t, t): i for t, i in openclip_tokenizer.vocab.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in openclip_tokenizer.merges),
                                       encoding="utf-8")
    ours = load_tokenizer(str(folder))
    np.testing.assert_array_equal(ours.encode(HARD_PROMPTS), _hf_ids(folder, HARD_PROMPTS))
    # open_clip's front end gives the same tokens, padded with 0 instead of <|endoftext|>
    hf_style, oc_style = ours.encode(PROMPTS), openclip_tokenizer.encode(PROMPTS)
    np.testing.assert_array_equal(np.where(oc_style == 0, ours.pad_id, oc_style)[:, 1:], hf_style[:, 1:])


def test_clip_tokenizer_save_load(small_merges, tmp_path):
    ours = CLIPTokenizer.from_hf_dir(str(_write_hf_folder(tmp_path / "src", small_merges, {"pad_token": "!"})))
    ours.save(str(tmp_path / "saved"))
    again = load_tokenizer(str(tmp_path / "saved"))
    assert isinstance(again, CLIPTokenizer) and again.pad_id == ours.pad_id and again.clean == "hf"
    np.testing.assert_array_equal(again.encode(PROMPTS), ours.encode(PROMPTS))


def test_word_tokenizer():
    tok = WordTokenizer.from_texts(["A red circle", "a blue square, bouncing!"], context_length=6)
    assert tok.words == ["a", "blue", "bouncing", "circle", "red", "square"]
    assert tok.vocab_size == 4 + 6
    ids = tok.encode(["Red CIRCLE, green circle", "", "a a a a a a a"])
    a, red, circle = (tok.ids[w] for w in ("a", "red", "circle"))
    want = np.array([[tok.bos_id, red, circle, tok.unk_id, circle, tok.eos_id],
                     [tok.bos_id, tok.eos_id, 0, 0, 0, 0],
                     [tok.bos_id, a, a, a, a, tok.eos_id]], np.int32)  # truncated to 4 words
    np.testing.assert_array_equal(ids, want)
    assert ids.dtype == np.int32
    with pytest.raises(ValueError, match="duplicated"):
        WordTokenizer(["cat", "cat"])
    with pytest.raises(ValueError, match="bad"):
        WordTokenizer(["Cat"])


def test_word_tokenizer_save_load(tmp_path):
    tok = WordTokenizer(["circle", "red", "square"], context_length=8)
    tok.save(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert isinstance(again, WordTokenizer) and again.words == tok.words and again.context_length == 8
    np.testing.assert_array_equal(again.encode(["red square", "blue"]), tok.encode(["red square", "blue"]))
    with pytest.raises(ValueError, match="not a 'clip_bpe' tokenizer"):
        CLIPTokenizer.load(str(tmp_path))


def test_load_tokenizer_rejects_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer here"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing"):
        CLIPTokenizer.from_hf_dir(str(tmp_path))

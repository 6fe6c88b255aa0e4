"""umT5 encoder (Wan's text encoder): parity with transformers' ``UMT5EncoderModel`` built tiny and random here
(<= 1e-5 relative, float32), padded rows zeroed, converters for transformers and Wan-release names, the bucket
table against a plain-NumPy float64 reference, and the tokenizer's ids identical to transformers' T5 tokenizer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from convert.readers import CheckpointError
from convert.umt5 import convert_hf_umt5, convert_original_umt5, load_hf_umt5, umt5_config_from_hf
from jaxlongvid.models.umt5 import UMT5Config, UMT5Tokenizer, clean_prompt, encode, relative_position_bucket

HF = dict(vocab_size=97, d_model=24, d_ff=40, num_heads=3, d_kv=10, num_layers=3,
          relative_attention_num_buckets=8, relative_attention_max_distance=12, feed_forward_proj="gated-gelu",
          layer_norm_epsilon=1e-6)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import UMT5Config as HFConfig, UMT5EncoderModel

    torch.manual_seed(0)
    model = UMT5EncoderModel(HFConfig(**HF)).eval()
    with torch.no_grad():  # non-trivial norm gains and position biases
        for name, p in model.named_parameters():
            if "layer_norm" in name or "relative_attention_bias" in name:
                p.normal_(1.0 if "layer_norm" in name else 0.0, 0.5)
    return model


def inputs(lengths, n=30):
    rng = np.random.default_rng(1)
    ids = rng.integers(2, HF["vocab_size"], (len(lengths), n))
    mask = np.arange(n)[None, :] < np.asarray(lengths)[:, None]
    return np.where(mask, ids, 0).astype(np.int32), mask


def reference_bucket(q: int, k: int, num_buckets: int, max_distance: int) -> np.ndarray:
    out = np.zeros((q, k), np.int64)
    half = num_buckets // 2
    exact = half // 2
    for i in range(q):
        for j in range(k):
            rel = j - i
            b = half if rel > 0 else 0
            rel = abs(rel)
            if rel < exact:
                out[i, j] = b + rel
            else:
                large = exact + int(math.log(rel / exact) / math.log(max_distance / exact) * (half - exact))
                out[i, j] = b + min(large, half - 1)
    return out


@pytest.mark.parametrize("buckets,distance", [(8, 12), (32, 128)])
def test_bucket_against_reference(buckets, distance):
    np.testing.assert_array_equal(relative_position_bucket(300, 300, buckets, distance),
                                  reference_bucket(300, 300, buckets, distance))


def test_parity_with_transformers(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)  # a text_encoder/ folder: config.json + model.safetensors
    config, params = load_hf_umt5(str(tmp_path))
    assert config == umt5_config_from_hf(HF)
    ids, mask = inputs([30, 17, 1])
    with torch.no_grad():
        want = hf_model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).last_hidden_state
    want = want.numpy() * mask[..., None]  # Wan's pipeline keeps only each prompt's rows
    got = np.asarray(encode(params, config, ids, mask))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert not got[1, 17:].any() and not got[2, 1:].any() and got[2, 0].any()


def test_state_dict_with_tied_copy_and_without_shared(hf_model):
    state = hf_model.state_dict()
    config = umt5_config_from_hf(HF)
    both = convert_hf_umt5({k: v for k, v in state.items()}, config)
    only_copy = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v
                 for k, v in state.items() if k != "encoder.embed_tokens.weight"}
    np.testing.assert_array_equal(convert_hf_umt5(only_copy, config)["token_embedding"]["embedding"],
                                  both["token_embedding"]["embedding"])


def to_original_names(state):
    """transformers' names -> the Wan release's (as in its t5.py), to check the original-name table."""
    out = {}
    for k, v in state.items():
        if k == "encoder.embed_tokens.weight":
            continue
        k = k.replace("shared.weight", "token_embedding.weight").replace("encoder.final_layer_norm", "norm")
        k = k.replace("encoder.block.", "blocks.").replace(".layer.0.layer_norm", ".norm1")
        k = k.replace(".layer.0.SelfAttention.relative_attention_bias", ".pos_embedding.embedding")
        k = k.replace(".layer.0.SelfAttention.", ".attn.").replace(".layer.1.layer_norm", ".norm2")
        k = k.replace(".layer.1.DenseReluDense.wi_0", ".ffn.gate.0").replace(".layer.1.DenseReluDense.wi_1", ".ffn.fc1")
        out[k.replace(".layer.1.DenseReluDense.wo", ".ffn.fc2")] = v.to(torch.bfloat16)
    return out


def test_original_release_names_bf16(hf_model, tmp_path):
    config = umt5_config_from_hf(HF)
    want = convert_hf_umt5(hf_model.state_dict(), config)
    torch.save(to_original_names(hf_model.state_dict()), tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    got = convert_original_umt5(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", config)
    for path in (("blocks_1", "attn", "pos_embedding"), ("blocks_2", "ffn", "gate", "kernel"), ("norm", "scale")):
        a, b = got, want
        for p in path:
            a, b = a[p], b[p]
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)  # bf16 storage


def test_wrong_checkpoints(hf_model, tmp_path):
    config = umt5_config_from_hf(HF)
    with pytest.raises(CheckpointError, match=r"model parameters have no checkpoint key: blocks_0/attn/pos_embedding"):
        convert_hf_umt5({k: v for k, v in hf_model.state_dict().items() if "block.0." not in k
                         or "relative" not in k}, config)
    with pytest.raises(CheckpointError, match="not a umT5 encoder \\(Wan release\\) checkpoint"):
        convert_original_umt5(hf_model.state_dict(), config)
    with pytest.raises(CheckpointError, match="feed_forward_proj='relu' is not supported"):
        umt5_config_from_hf({**HF, "feed_forward_proj": "relu"})
    with pytest.raises(ValueError, match="num_buckets must be a positive multiple of 4"):
        UMT5Config(num_buckets=6)


# ---- tokenizer ----------------------------------------------------------------------------------------------------
CORPUS = ["a red circle bouncing on the floor", "two blue squares spin slowly", "the cat jumps over a green fence",
          "café naïve über", "numbers 12345 and symbols !?"] * 3


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import SentencePieceUnigramTokenizer

    folder = tmp_path_factory.mktemp("umt5_tokenizer")
    tok = SentencePieceUnigramTokenizer()
    tok.train_from_iterator(CORPUS, vocab_size=80, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                            show_progress=False)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_tokenizer_ids_identical_to_transformers(tokenizer_dir, tmp_path):
    from transformers import T5Tokenizer

    prompts = ["a red circle", "  café   xyz!! &amp; more\n", "two blue squares spin slowly " * 4, "", "ZZZ 987"]
    hf = T5Tokenizer(tokenizer_file=str(tokenizer_dir / "tokenizer.json"), extra_ids=0)
    ours = UMT5Tokenizer.from_dir(str(tokenizer_dir), text_len=16)
    ids, mask = ours.encode(prompts)
    want = hf([clean_prompt(p) for p in prompts], padding="max_length", max_length=16, truncation=True)
    np.testing.assert_array_equal(ids, want.input_ids)
    np.testing.assert_array_equal(mask, np.asarray(want.attention_mask, bool))
    assert clean_prompt("  café   xyz!! &amp;amp; more\n") == "café xyz!! & more"
    ours.save(str(tmp_path))
    np.testing.assert_array_equal(UMT5Tokenizer.from_dir(str(tmp_path), text_len=16).encode(prompts)[0], ids)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        UMT5Tokenizer.from_dir(str(tmp_path / "nowhere"))


def test_full_size_manifest_maps_onto_umt5_xxl():
    """Every key of the full umT5-XXL encoder (names + shapes, built on the meta device) maps onto one leaf of
    the preset's ``eval_shape`` tree; only the tied embedding copy is dropped."""
    import json
    from pathlib import Path

    from convert.rules import plan_conversion
    from convert.tree import flat_shapes
    from convert.umt5 import hf_rules
    from jaxlongvid.models.umt5 import param_shapes

    m = json.loads((Path(__file__).parent / "fixtures/manifests/umt5_xxl_encoder.json").read_text())
    config = UMT5Config.umt5_xxl()
    assert umt5_config_from_hf(m["constructor_config"]) == config
    shapes = {k: tuple(v[0]) for k, v in m["keys"].items()}
    expected = param_shapes(config)
    plan = plan_conversion(shapes, hf_rules(shapes), expected, "umt5-xxl manifest")
    assert sorted(k for k, (p, _) in plan.items() if p is None) == ["encoder.embed_tokens.weight"]
    assert len(flat_shapes(expected)) == len(shapes) - 1
    assert sum(int(np.prod(s)) for s in flat_shapes(expected).values()) == m["num_elements"] - 256384 * 4096

"""umT5 encoder checkpoints -> Flax params of :class:`jaxlongvid.models.umt5.UMT5Encoder` (rename tables run by
:mod:`convert.rules`).

Two sources:

* transformers ``UMT5EncoderModel`` (a diffusers Wan ``text_encoder/`` folder, sharded safetensors with an index):
  ``shared`` (and its tied copy ``encoder.embed_tokens``), ``encoder.block.N.layer.0.{layer_norm, SelfAttention.{q,
  k,v,o}, SelfAttention.relative_attention_bias}``, ``encoder.block.N.layer.1.{layer_norm, DenseReluDense.{wi_0,
  wi_1, wo}}``, ``encoder.final_layer_norm``;
* the original Wan release ``models_t5_umt5-xxl-enc-bf16.pth``: ``token_embedding``, ``blocks.N.{norm1, attn.{q,k,
  v,o}, pos_embedding.embedding, norm2, ffn.{gate.0, fc1, fc2}}``, ``norm``.
"""

from __future__ import annotations

from typing import Mapping

from convert.readers import CheckpointError, read_config_json
from convert.rules import Rules, convert_state, open_checkpoint
from jaxlongvid.models.umt5 import UMT5Config, param_shapes

HF_RENAMES = (
    (r"^(shared|encoder\.embed_tokens)\.weight$", "token_embedding.embedding"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"blocks.\1.norm1."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$",
     r"blocks.\1.attn.pos_embedding"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.", r"blocks.\1.attn."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"blocks.\1.norm2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.", r"blocks.\1.ffn.gate."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.", r"blocks.\1.ffn.fc1."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.", r"blocks.\1.ffn.fc2."),
    (r"^encoder\.final_layer_norm\.", "norm."),
)
ORIGINAL_RENAMES = (
    (r"^token_embedding\.weight$", "token_embedding.embedding"),
    (r"^blocks\.(\d+)\.pos_embedding\.embedding\.weight$", r"blocks.\1.attn.pos_embedding"),
    (r"^blocks\.(\d+)\.ffn\.gate\.0\.", r"blocks.\1.ffn.gate."),
)


def _tied_copy(value) -> None:
    """``encoder.embed_tokens`` is the tied copy of ``shared``: dropped."""
    return None


def hf_rules(keys) -> Rules:
    """transformers' names; when both ``shared`` and its tied copy ``encoder.embed_tokens`` are saved, the copy
    is dropped."""
    tied = (("^encoder\\.embed_tokens\\.weight$", _tied_copy),) if "shared.weight" in keys else ()
    return Rules(title="umT5 encoder (transformers)", renames=HF_RENAMES, constants=tied)


ORIGINAL_RULES = Rules(title="umT5 encoder (Wan release)", renames=ORIGINAL_RENAMES)


def umt5_config_from_hf(cfg: Mapping, text_len: int = 512) -> UMT5Config:
    """``UMT5Config`` from a transformers ``UMT5Config`` ``config.json``; other feed-forward kinds are rejected."""
    act = cfg.get("feed_forward_proj", "gated-gelu")
    if act != "gated-gelu":
        raise CheckpointError(f"umT5 config: feed_forward_proj={act!r} is not supported (need 'gated-gelu')")
    return UMT5Config(vocab_size=cfg["vocab_size"], dim=cfg["d_model"], ffn_dim=cfg["d_ff"],
                      num_heads=cfg["num_heads"], head_dim=cfg["d_kv"], num_layers=cfg["num_layers"],
                      num_buckets=cfg.get("relative_attention_num_buckets", 32),
                      max_distance=cfg.get("relative_attention_max_distance", 128),
                      eps=cfg.get("layer_norm_epsilon", 1e-6), text_len=text_len)


def convert_hf_umt5(source, config: UMT5Config, dtype="float32") -> dict:
    """A transformers ``UMT5EncoderModel`` checkpoint (file, folder, index or state dict) -> Flax params."""
    src = open_checkpoint(source)
    return convert_state(src, hf_rules(src.shapes), param_shapes(config), dtype)


def convert_original_umt5(source, config: UMT5Config | None = None, dtype="float32") -> dict:
    """Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` (or its state dict) -> Flax params (default: umT5-XXL)."""
    return convert_state(open_checkpoint(source), ORIGINAL_RULES, param_shapes(config or UMT5Config()), dtype)


def load_hf_umt5(folder: str, dtype="float32") -> tuple[UMT5Config, dict]:
    """``(config, params)`` from a transformers ``text_encoder/`` folder."""
    config = umt5_config_from_hf(read_config_json(folder))
    return config, convert_hf_umt5(folder, config, dtype)

"""umT5 encoder in Flax (Wan2.1's text encoder, umT5-XXL) and its tokenizer.

A block is pre-norm: ``x + attn(rms(x))`` then ``x + ffn(rms(x))``, with

* RMS layer norm without mean or bias: ``w * x / sqrt(mean(x^2) + eps)``, statistics in float32;
* self-attention without bias and without the ``1/sqrt(d)`` scale (T5's choice), plus a learned relative position
  bias that umT5 (unlike T5) keeps in *every* layer: ``[num_buckets, heads]`` looked up by the bidirectional T5
  bucket of ``key - query`` (half the buckets per direction, half of those exact, the rest log-spaced up to
  ``max_distance``); padded keys are masked out;
* gated-GELU feed-forward: ``fc2(gelu_tanh(gate(x)) * fc1(x))``;

then a final RMS norm. Wan uses the last hidden state with the rows past each prompt's length set to zero
(``encode``), 512 tokens per prompt.

Parameter names follow the original Wan code (``token_embedding``, ``blocks_i/{norm1, attn/{q,k,v,o},
pos_embedding, norm2, ffn/{gate, fc1, fc2}}``, ``norm``); ``convert/umt5.py`` maps transformers' names onto them.
"""

from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlongvid.configs import JsonConfig


@dataclass(frozen=True)
class UMT5Config(JsonConfig):
    """Hyper-parameters of a umT5 encoder (defaults: umT5-XXL as Wan2.1 uses it)."""

    vocab_size: int = 256384
    dim: int = 4096  # d_model
    ffn_dim: int = 10240  # d_ff
    num_heads: int = 64
    head_dim: int = 64  # d_kv (num_heads * head_dim need not equal dim)
    num_layers: int = 24
    num_buckets: int = 32  # relative_attention_num_buckets
    max_distance: int = 128  # relative_attention_max_distance
    eps: float = 1e-6  # layer_norm_epsilon
    text_len: int = 512  # tokens per prompt

    def __post_init__(self):
        if self.num_buckets < 4 or self.num_buckets % 4:
            raise ValueError(f"UMT5Config.num_buckets must be a positive multiple of 4, got {self.num_buckets}")

    @classmethod
    def umt5_xxl(cls) -> "UMT5Config":
        """google/umt5-xxl's encoder, Wan2.1's text encoder."""
        return cls()


# ---- spec ---------------------------------------------------------------------------------------------------------
def relative_position_bucket(query_len: int, key_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's bidirectional bucket of ``key - query``, int32 ``[query_len, key_len]`` in ``[0, num_buckets)``."""
    rel = np.arange(key_len)[None, :] - np.arange(query_len)[:, None]
    half = num_buckets // 2
    bucket = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    max_exact = half // 2
    far = np.maximum(rel, max_exact).astype(np.float32)  # the log branch is used only from max_exact on
    large = max_exact + (np.log(far / max_exact) / np.log(max_distance / max_exact)
                         * (half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (bucket + np.where(rel < max_exact, rel, large)).astype(np.int32)


def rms_norm(x, scale, eps: float):
    """T5 layer norm: no mean subtracted, no bias; statistics in float32, the result in ``x``'s dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (scale * x32.astype(x.dtype)).astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x):
        return rms_norm(x, self.param("scale", nn.initializers.ones, (x.shape[-1],)), self.eps)


class Attention(nn.Module):
    config: UMT5Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask):
        cfg = self.config
        b, n, _ = x.shape
        inner = cfg.num_heads * cfg.head_dim
        q, k, v = (nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)(x)
                   .reshape(b, n, cfg.num_heads, cfg.head_dim) for name in "qkv")
        table = self.param("pos_embedding", nn.initializers.normal(1.0), (cfg.num_buckets, cfg.num_heads))
        bias = table[relative_position_bucket(n, n, cfg.num_buckets, cfg.max_distance)]  # [n, n, heads]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)  # no 1/sqrt(d)
        logits = logits + bias.transpose(2, 0, 1).astype(jnp.float32)[None]
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, inner)
        return nn.Dense(cfg.dim, use_bias=False, dtype=self.dtype, name="o")(out)


class FeedForward(nn.Module):
    config: UMT5Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = partial(nn.Dense, use_bias=False, dtype=self.dtype)
        gate = jax.nn.gelu(dense(cfg.ffn_dim, name="gate")(x), approximate=True)
        return dense(cfg.dim, name="fc2")(gate * dense(cfg.ffn_dim, name="fc1")(x))


class Block(nn.Module):
    config: UMT5Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask):
        cfg = self.config
        x = x + Attention(cfg, self.dtype, name="attn")(RMSNorm(cfg.eps, name="norm1")(x), key_mask)
        return x + FeedForward(cfg, self.dtype, name="ffn")(RMSNorm(cfg.eps, name="norm2")(x))


class UMT5Encoder(nn.Module):
    """Token ids ``[B, L]`` and a bool mask ``[B, L]`` (True for real tokens) -> last hidden state ``[B, L, dim]``."""

    config: UMT5Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, token_ids, mask):
        cfg = self.config
        x = nn.Embed(cfg.vocab_size, cfg.dim, name="token_embedding")(token_ids).astype(self.dtype)
        for i in range(cfg.num_layers):
            x = Block(cfg, self.dtype, name=f"blocks_{i}")(x, mask)
        return RMSNorm(cfg.eps, name="norm")(x)


@partial(jax.jit, static_argnames=("config", "dtype"))
def encode(params, config: UMT5Config, token_ids, mask, dtype=jnp.float32):
    """The text context Wan cross-attends to: float32 ``[B, L, dim]``, rows past each prompt's length zero."""
    mask = jnp.asarray(mask, bool)
    out = UMT5Encoder(config, dtype).apply({"params": params}, token_ids, mask).astype(jnp.float32)
    return jnp.where(mask[..., None], out, 0.0)


def param_shapes(config: UMT5Config):
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (nothing allocated; full-size models included)."""
    ids = jnp.zeros((1, 8), jnp.int32)
    return jax.eval_shape(lambda: UMT5Encoder(config).init(jax.random.key(0), ids, ids > 0)["params"])


# ---- tokenizer ----------------------------------------------------------------------------------------------------
def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ``ftfy.fix_text`` (when installed), HTML entities unescaped twice, whitespace runs
    collapsed to one space, ends stripped."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class UMT5Tokenizer:
    """The released umT5 tokenizer (``tokenizer.json``, a SentencePiece Unigram model) run by the ``tokenizers``
    library. ``encode(prompts) -> (ids int32 [B, text_len], mask bool [B, text_len])``: the cleaned prompt's
    pieces, truncated to ``text_len - 1``, then ``</s>``, then ``<pad>`` -- what transformers' T5 tokenizer gives
    with ``padding="max_length", truncation=True``."""

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
        from tokenizers import Tokenizer

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
        os.makedirs(folder, exist_ok=True)
        self.tokenizer.save(os.path.join(folder, "tokenizer.json"))

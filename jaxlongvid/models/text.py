"""CLIP-style text encoders in Flax: the context ``[B, L, D]`` the video UNets cross-attend to.

One module covers both families the short-video models use, because their text towers compute the same thing:

* HF ``CLIPTextModel`` (SD 1.4 text encoder = OpenAI CLIP ViT-L/14; LaVie; ModelScope's diffusers export):
  ``last_hidden_state``, i.e. all layers then the final LayerNorm;
* OpenCLIP's text transformer as VideoCrafter's ``FrozenOpenCLIPEmbedder`` runs it (ViT-H/14, ``layer="penultimate"``):
  all residual blocks but the last, then ``ln_final``. That is ``skip_last_layers=1`` here; the skipped layer
  is not even built, so its weights are neither converted nor held.

A layer is pre-LayerNorm: ``x + attn(ln_1(x))`` with a causal mask, then ``x + mlp(ln_2(x))`` with
``fc1 -> activation -> fc2``. The activation is ``quick_gelu`` (``x * sigmoid(1.702 x)``, OpenAI CLIP) or exact erf
``gelu`` (OpenCLIP ViT-H). Embeddings are token + learned absolute position. No pooling, no projection.
LayerNorm statistics and softmax run in float32 whatever the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlongvid.configs import JsonConfig
from jaxlongvid.models.tokenizers import CLIPTokenizer, WordTokenizer, load_tokenizer  # noqa: F401 (re-export)

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": partial(jax.nn.gelu, approximate=False),
}


@dataclass(frozen=True)
class TextConfig(JsonConfig):
    """Hyper-parameters of a CLIP-style causal text transformer."""

    vocab_size: int = 49408
    context_length: int = 77  # number of learned positions (the longest token sequence)
    width: int = 768
    num_layers: int = 12  # layers in the checkpoint
    num_heads: int = 12
    mlp_dim: int = 3072
    activation: str = "quick_gelu"  # "quick_gelu" | "gelu" (exact erf)
    layer_norm_eps: float = 1e-5
    skip_last_layers: int = 0  # run only the first num_layers - skip_last_layers (1 = OpenCLIP "penultimate")

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"TextConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.width % self.num_heads:
            raise ValueError(f"TextConfig: width {self.width} is not divisible by num_heads {self.num_heads}")
        if not 0 <= self.skip_last_layers < self.num_layers:
            raise ValueError(f"TextConfig.skip_last_layers must be in [0, num_layers), got {self.skip_last_layers}")

    @property
    def used_layers(self) -> int:
        return self.num_layers - self.skip_last_layers

    @classmethod
    def clip_vit_l14(cls) -> "TextConfig":
        """OpenAI CLIP ViT-L/14 text encoder as in Stable Diffusion 1.4 (LaVie), context = last hidden state."""
        return cls()

    @classmethod
    def openclip_vit_h14(cls) -> "TextConfig":
        """OpenCLIP ViT-H/14 text tower with VideoCrafter1/2's "penultimate" output."""
        return cls(width=1024, num_layers=24, num_heads=16, mlp_dim=4096, activation="gelu", skip_last_layers=1)

    @classmethod
    def tiny(cls, vocab_size: int, context_length: int = 16) -> "TextConfig":
        """A small encoder to train from scratch with a :class:`WordTokenizer` (the bundled tiny model)."""
        return cls(vocab_size=vocab_size, context_length=context_length, width=64, num_layers=2, num_heads=4,
                   mlp_dim=256, activation="gelu")


def _layer_norm(x, eps: float, name: str, dtype):
    norm = nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=jnp.float32, name=name)
    return norm(x.astype(jnp.float32)).astype(dtype)


class CausalSelfAttention(nn.Module):
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, n, width = x.shape
        head_dim = width // self.num_heads
        q, k, v = (nn.Dense(width, dtype=self.dtype, name=name)(x).reshape(b, n, self.num_heads, head_dim)
                   for name in ("q", "k", "v"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * head_dim ** -0.5
        causal = jnp.tril(jnp.ones((n, n), bool))
        logits = jnp.where(causal, logits, -jnp.inf)  # the diagonal is always kept, so no row is empty
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, width)
        return nn.Dense(width, dtype=self.dtype, name="out")(out)


class EncoderLayer(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = x + CausalSelfAttention(cfg.num_heads, self.dtype, name="attn")(
            _layer_norm(x, cfg.layer_norm_eps, "ln_1", self.dtype))
        h = _layer_norm(x, cfg.layer_norm_eps, "ln_2", self.dtype)
        h = nn.Dense(cfg.mlp_dim, dtype=self.dtype, name="fc1")(h)
        h = ACTIVATIONS[cfg.activation](h)
        return x + nn.Dense(cfg.width, dtype=self.dtype, name="fc2")(h)


class TextEncoder(nn.Module):
    """Token ids ``[B, L]`` (L <= context_length) -> context ``[B, L, width]``."""

    config: TextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, token_ids):
        cfg = self.config
        n = token_ids.shape[-1]
        if n > cfg.context_length:
            raise ValueError(f"TextEncoder: {n} tokens but only {cfg.context_length} positions")
        embed = nn.Embed(cfg.vocab_size, cfg.width, name="token_embedding")
        positions = self.param("position_embedding", nn.initializers.normal(0.01), (cfg.context_length, cfg.width))
        x = (embed(token_ids) + positions[:n]).astype(self.dtype)
        for i in range(cfg.used_layers):
            x = EncoderLayer(cfg, self.dtype, name=f"layers_{i}")(x)
        return _layer_norm(x, cfg.layer_norm_eps, "ln_final", self.dtype)


@partial(jax.jit, static_argnames=("config", "dtype"))
def encode(params, config: TextConfig, token_ids, dtype=jnp.float32):
    """Context ``[B, L, width]`` (float32) for int token ids ``[B, L]``."""
    return TextEncoder(config, dtype).apply({"params": params}, token_ids).astype(jnp.float32)


def _init(config: TextConfig, rng):
    return TextEncoder(config).init(rng, jnp.zeros((1, config.context_length), jnp.int32))["params"]


def param_shapes(config: TextConfig):
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    return jax.eval_shape(lambda: _init(config, jax.random.key(0)))


def init_params(config: TextConfig, rng):
    """Random parameters (Flax default initialisers), e.g. for the tiny encoder trained from scratch."""
    return jax.jit(_init, static_argnums=0)(config, rng)

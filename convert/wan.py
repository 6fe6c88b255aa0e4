"""Wan2.1 transformer checkpoints -> Flax params of :class:`jaxlongvid.models.wan.WanTransformer`.

Two key layouts, one :class:`convert.rules.Rules` table each (kept as data below), run by the one engine in
:mod:`convert.rules`:

* diffusers (``transformer/`` of ``Wan-AI/Wan2.1-T2V-*-Diffusers``: ``WanTransformer3DModel``): the Flax names
  are diffusers' own apart from the feed-forward (``ffn.net.0.proj`` / ``ffn.net.2`` -> ``ffn/fc1`` / ``fc2``);
* the original release (``diffusion_pytorch_model*.safetensors`` of ``Wan-AI/Wan2.1-T2V-*``: ``WanModel``):
  ``self_attn`` / ``cross_attn`` with ``q k v o``, ``norm3`` the cross-attention norm (diffusers' ``norm2``),
  ``modulation`` the per-block ``scale_shift_table``, numbered ``Sequential`` embeddings, ``head.head``.

The rotary tables are not parameters in either (diffusers' are non-persistent buffers; the original keeps them
off the state dict), so nothing is dropped.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from convert.readers import CheckpointError, read_config_json
from convert.rules import Rules, convert_state, open_checkpoint
from jaxlongvid.models.wan import WanConfig, WanTransformer

DIFFUSERS_RENAMES = (
    (r"(^|\.)ffn\.net\.0\.proj\.", r"\1ffn.fc1."),
    (r"(^|\.)ffn\.net\.2\.", r"\1ffn.fc2."),
)
ORIGINAL_RENAMES = (
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^(blocks\.\d+\.)self_attn\.", r"\1attn1."),
    (r"^(blocks\.\d+\.)cross_attn\.", r"\1attn2."),
    (r"(\.attn[12]\.)([qkv])\.", r"\1to_\2."),
    (r"(\.attn[12]\.)o\.", r"\1to_out.0."),
    (r"^(blocks\.\d+\.)norm3\.", r"\1norm2."),
    (r"^(blocks\.\d+\.)ffn\.0\.", r"\1ffn.fc1."),
    (r"^(blocks\.\d+\.)ffn\.2\.", r"\1ffn.fc2."),
    (r"^(blocks\.\d+\.)modulation$", r"\1scale_shift_table"),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
)


def _identify(keys) -> str:
    if any(k.startswith("condition_embedder.") for k in keys):
        return " (the keys look like a diffusers WanTransformer3DModel)"
    if any(k.startswith("time_projection.") for k in keys):
        return " (the keys look like an original Wan2.1 WanModel)"
    return ""


DIFFUSERS_RULES = Rules("Wan transformer (diffusers layout)", DIFFUSERS_RENAMES, identify=_identify)
ORIGINAL_RULES = Rules("Wan transformer (original layout)", ORIGINAL_RENAMES, identify=_identify)
LAYOUT_RULES = {"diffusers": DIFFUSERS_RULES, "original": ORIGINAL_RULES}


@functools.lru_cache(maxsize=8)
def init_shapes(config: WanConfig):
    """The parameter shape tree of ``WanTransformer(config)`` via ``jax.eval_shape`` (nothing materialised;
    cached per config: treat it as read-only)."""
    pt, ph, pw = config.patch_size
    x = jax.ShapeDtypeStruct((1, pt, ph, pw, config.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    ctx = jax.ShapeDtypeStruct((1, 1, config.text_dim), jnp.float32)
    return jax.eval_shape(WanTransformer(config).init, jax.random.key(0), x, t, ctx)["params"]


def convert_transformer(source, config: WanConfig, layout: str = "diffusers") -> dict:
    """A weights file or state dict of a Wan transformer in ``layout`` ("diffusers" | "original") -> params."""
    if layout not in LAYOUT_RULES:
        raise ValueError(f"layout must be one of {sorted(LAYOUT_RULES)}, got {layout!r}")
    return convert_state(open_checkpoint(source), LAYOUT_RULES[layout], init_shapes(config))


def convert_transformer_folder(folder, layout: str = "diffusers") -> tuple[WanConfig, dict]:
    """A model folder (``config.json`` + weights, single file or sharded with ``.index.json``) -> (config, params).

    diffusers: the ``transformer/`` folder of a Wan pipeline; original: the release folder, whose
    ``config.json`` holds ``WanModel``'s arguments."""
    folder = os.fspath(folder)
    cfg_json = read_config_json(folder)
    try:
        config = WanConfig.from_diffusers(cfg_json) if layout == "diffusers" else WanConfig.from_original(cfg_json)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}/config.json: {e}") from None
    return config, convert_transformer(folder, config, layout)

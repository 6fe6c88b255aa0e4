"""PyTorch CLIP text towers -> Flax params of :class:`jaxlongvid.models.text.TextEncoder`.

* HF ``CLIPTextModel`` (a transformers ``text_encoder/`` folder): keys ``[text_model.]embeddings.*``,
  ``encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2, layer_norm2}``,
  ``final_layer_norm`` (transformers >= 5 saves without the ``text_model.`` prefix; older files have it).
* OpenCLIP's text transformer inside a VideoCrafter ``.ckpt`` (prefix ``cond_stage_model.model.``):
  ``token_embedding``, ``positional_embedding``, ``transformer.resblocks.N.{ln_1, attn.in_proj_weight/bias
  (q, k, v stacked along the output axis), attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_final``.
  ``text_projection`` and ``logit_scale`` (only used for CLIP's pooled embedding) are not needed.

Layers the config skips (``skip_last_layers``, e.g. VideoCrafter's "penultimate") are dropped on purpose. Every
other key must map onto the model: missing, unexpected and mis-shaped weights come back in one CheckpointError.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np

from convert.readers import (CheckpointError, as_float32, iter_prefixed, load_state_dict, read_config_json,
                             read_folder_weights)
from convert.tree import flat_shapes, validate
from jaxlongvid.models.text import ACTIVATIONS, TextConfig, param_shapes

_LAYER = re.compile(r"^(?:encoder\.layers|transformer\.resblocks)\.(\d+)\.(.+)$")
_HF_LAYER_MODULES = {"self_attn.q_proj": "attn/q", "self_attn.k_proj": "attn/k", "self_attn.v_proj": "attn/v",
                     "self_attn.out_proj": "attn/out", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                     "mlp.fc1": "fc1", "mlp.fc2": "fc2"}
_OPENCLIP_LAYER_MODULES = {"attn.out_proj": "attn/out", "ln_1": "ln_1", "ln_2": "ln_2", "mlp.c_fc": "fc1",
                           "mlp.c_proj": "fc2"}
# tensors outside the layers: checkpoint key -> Flax path (no layout change: embeddings and LayerNorms)
_HF_TOP = {"embeddings.token_embedding.weight": "token_embedding/embedding",
           "embeddings.position_embedding.weight": "position_embedding",
           "final_layer_norm.weight": "ln_final/scale", "final_layer_norm.bias": "ln_final/bias"}
_OPENCLIP_TOP = {"token_embedding.weight": "token_embedding/embedding", "positional_embedding": "position_embedding",
                 "ln_final.weight": "ln_final/scale", "ln_final.bias": "ln_final/bias"}
_HF_IGNORED = {"embeddings.position_ids", "text_projection.weight"}  # a buffer; the pooled-output projection
_OPENCLIP_IGNORED = {"text_projection", "logit_scale", "attn_mask"}


def text_config_from_hf(cfg: Mapping, skip_last_layers: int = 0) -> TextConfig:
    """``TextConfig`` from a transformers ``CLIPTextConfig`` (or a ``CLIPConfig`` holding one) ``config.json``."""
    cfg = cfg.get("text_config", cfg)
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"text encoder config: hidden_act={act!r} is not supported ({sorted(ACTIVATIONS)})")
    return TextConfig(vocab_size=cfg.get("vocab_size", 49408), context_length=cfg.get("max_position_embeddings", 77),
                      width=cfg.get("hidden_size", 512), num_layers=cfg.get("num_hidden_layers", 12),
                      num_heads=cfg.get("num_attention_heads", 8), mlp_dim=cfg.get("intermediate_size", 2048),
                      activation=act, layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
                      skip_last_layers=skip_last_layers)


def _leaf(module: str, kind: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """``module`` is already a Flax path; ``kind`` is the PyTorch tensor name."""
    if kind == "bias":
        return f"{module}/bias", value
    if kind == "weight" and value.ndim == 2:  # Linear [out, in] -> [in, out]
        return f"{module}/kernel", value.T
    if kind == "weight" and value.ndim == 1:  # LayerNorm
        return f"{module}/scale", value
    return f"{module}/{kind}", value


def _layer_entries(rest: str, value: np.ndarray, modules: Mapping[str, str]) -> list[tuple[str, np.ndarray]] | None:
    """One encoder-layer tensor (name inside the layer) -> Flax ``(path inside the layer, array)`` entries."""
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias") and value.shape[0] % 3 == 0:
        kind = "weight" if rest.endswith("weight") else "bias"
        return [_leaf(f"attn/{name}", kind, part) for name, part in zip("qkv", np.split(value, 3, axis=0))]
    module, _, kind = rest.rpartition(".")
    if module in modules:
        return [_leaf(modules[module], kind, value)]
    return None


def _convert(state: Mapping[str, np.ndarray], config: TextConfig, *, top: Mapping[str, str],
             layer_modules: Mapping[str, str], ignored: set[str], what: str) -> dict:
    expected = param_shapes(config)
    want = flat_shapes(expected)
    converted = {}
    for key, value in as_float32(state).items():
        if key in ignored:
            continue
        entries = None
        m = _LAYER.match(key)
        if m:
            if config.used_layers <= int(m.group(1)) < config.num_layers:
                continue  # a final layer the config skips (e.g. the "penultimate" output)
            entries = _layer_entries(m.group(2), value, layer_modules)
            entries = entries and [(f"layers_{m.group(1)}/{path}", v) for path, v in entries]
        elif key in top:
            entries = [(top[key], value)]
        for path, v in entries or [(key, value)]:
            # a key that maps nowhere keeps its checkpoint name, so the error shows what the file contains
            converted[path if entries and path in want else key] = v
    return validate(converted, expected, what)


def convert_hf_clip_text(state: Mapping[str, np.ndarray], config: TextConfig,
                         what: str = "HF CLIPTextModel") -> dict:
    """transformers ``CLIPTextModel`` state dict (with or without ``text_model.``) -> nested Flax params."""
    if any(k.startswith("text_model.") for k in state):
        state = dict(iter_prefixed(state, "text_model."))  # also drops a CLIPModel's vision tower
    return _convert(state, config, top=_HF_TOP, layer_modules=_HF_LAYER_MODULES, ignored=_HF_IGNORED, what=what)


def convert_openclip_text(state: Mapping[str, np.ndarray], config: TextConfig | None = None,
                          prefix: str = "cond_stage_model.model.") -> dict:
    """The ``prefix``-ed OpenCLIP text-tower keys of a checkpoint state dict -> nested Flax params."""
    config = config or TextConfig.openclip_vit_h14()
    sub = dict(iter_prefixed(state, prefix))
    if not sub:
        raise CheckpointError(f"OpenCLIP text tower: no keys start with {prefix!r}; is this a VideoCrafter .ckpt?")
    sub = {k: v for k, v in sub.items() if not k.startswith("visual.")}  # a full CLIP model's image tower
    return _convert(sub, config, top=_OPENCLIP_TOP, layer_modules=_OPENCLIP_LAYER_MODULES,
                    ignored=_OPENCLIP_IGNORED, what=f"OpenCLIP text tower ({prefix}*)")


# ---- entry points ------------------------------------------------------------------------------------------
def load_hf_text_encoder(folder: str, skip_last_layers: int = 0) -> tuple[TextConfig, dict]:
    """``(config, params)`` from a transformers ``text_encoder/`` folder, or a pipeline folder that contains one.
    ``skip_last_layers`` is diffusers' ``clip_skip`` (0: the last hidden state, as LaVie and ModelScope use)."""
    if os.path.isfile(os.path.join(folder, "text_encoder", "config.json")):
        folder = os.path.join(folder, "text_encoder")
    config = text_config_from_hf(read_config_json(folder), skip_last_layers)
    return config, convert_hf_clip_text(read_folder_weights(folder), config, what=folder)


def load_openclip_text(checkpoint: str | Mapping[str, np.ndarray], config: TextConfig | None = None,
                       prefix: str = "cond_stage_model.model.") -> tuple[TextConfig, dict]:
    """``(config, params)`` from a VideoCrafter ``.ckpt`` path (or its loaded state dict); default config: OpenCLIP
    ViT-H/14 with the "penultimate" output."""
    config = config or TextConfig.openclip_vit_h14()
    state = load_state_dict(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    return config, convert_openclip_text(state, config, prefix)

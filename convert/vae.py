"""PyTorch KL autoencoder -> Flax params of :class:`jaxlongvid.models.vae.AutoencoderKL`.

Two sources:

* a diffusers ``vae/`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or ``.bin``), including
  the older attention names ``query/key/value/proj_attn`` that e.g. ``CompVis/stable-diffusion-v1-4`` still ships;
* the ``first_stage_model.*`` keys of an LDM-style ``.ckpt`` (VideoCrafter1/2, original Stable Diffusion), which use
  CompVis names: ``encoder.down.{i}.block.{j}``, ``encoder.down.{i}.downsample.conv``, ``mid.block_1``,
  ``mid.attn_1.{norm,q,k,v,proj_out}`` (q/k/v/proj_out as 1x1 convs), ``mid.block_2``, ``norm_out``,
  ``nin_shortcut``, and ``decoder.up.{i}`` numbered by resolution level, i.e. in the reverse order of diffusers'
  ``up_blocks``. They are first renamed to diffusers names (the same table diffusers' single-file loader uses),
  then converted like a diffusers folder.

Every result is checked against the model's ``jax.eval_shape`` tree: missing, unexpected and mis-shaped weights
are reported together in one :class:`CheckpointError`.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np

from convert.readers import (CheckpointError, as_float32, iter_prefixed, load_state_dict, read_config_json,
                             read_folder_weights)
from convert.tree import flat_shapes, validate
from jaxlongvid.models.vae import VAEConfig, param_shapes


# ---- config ------------------------------------------------------------------------------------------------
def vae_config_from_diffusers(cfg: Mapping) -> VAEConfig:
    """``VAEConfig`` from a diffusers ``AutoencoderKL`` ``config.json`` (diffusers' defaults where a key is absent).
    Anything this port does not implement is rejected by name."""
    cls = cfg.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise CheckpointError(f"VAE config: _class_name is {cls!r}; only AutoencoderKL is supported")
    problems = []
    n = len(cfg.get("block_out_channels", (64,)))
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(cfg.get(key, [want] * n))
        if types != [want] * n:
            problems.append(f"{key}={types} (need {n} x {want!r})")
    if cfg.get("act_fn", "silu") != "silu":
        problems.append(f"act_fn={cfg['act_fn']!r} (need 'silu')")
    if cfg.get("shift_factor") not in (None, 0, 0.0):
        problems.append(f"shift_factor={cfg['shift_factor']} (need none)")
    if cfg.get("latents_mean") is not None or cfg.get("latents_std") is not None:
        problems.append("latents_mean / latents_std (need none)")
    if problems:
        raise CheckpointError("VAE config not supported: " + "; ".join(problems))
    return VAEConfig(
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        latent_channels=cfg.get("latent_channels", 4),
        block_out_channels=tuple(cfg.get("block_out_channels", (64,))),
        layers_per_block=cfg.get("layers_per_block", 1),
        norm_num_groups=cfg.get("norm_num_groups", 32),
        scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
        use_quant_conv=cfg.get("use_quant_conv", True),
        use_post_quant_conv=cfg.get("use_post_quant_conv", True),
        mid_block_add_attention=cfg.get("mid_block_add_attention", True),
    )


# ---- renaming rules ----------------------------------------------------------------------------------------
# diffusers module path -> Flax module path (after these, the remaining dots become slashes)
_DIFFUSERS_TO_FLAX = [
    (r"(?<=\.)(down_blocks|up_blocks|resnets)\.(\d+)(?=\.)", r"\1_\2"),
    (r"\.downsamplers\.0\.conv\.", ".downsample."),
    (r"\.upsamplers\.0\.conv\.", ".upsample."),
    (r"\.attentions\.0\.", ".attention."),
    (r"\.to_out\.0\.", ".to_out."),
]
# diffusers' pre-0.14 attention names (still in some hub folders)
_DEPRECATED_ATTENTION = [
    (r"\.attentions\.0\.query\.", ".attentions.0.to_q."),
    (r"\.attentions\.0\.key\.", ".attentions.0.to_k."),
    (r"\.attentions\.0\.value\.", ".attentions.0.to_v."),
    (r"\.attentions\.0\.proj_attn\.", ".attentions.0.to_out.0."),
]
_LDM_TO_DIFFUSERS = [
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^encoder\.down\.(\d+)\.downsample\.conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv."),
    (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn_1\.(q|k|v)\.", r".mid_block.attentions.0.to_\1."),
    (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
]
_LDM_UP = re.compile(r"^decoder\.up\.(\d+)\.(block\.(\d+)|upsample\.conv)\.")


def _apply(rules, key: str) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def ldm_to_diffusers_names(state: Mapping[str, np.ndarray], num_levels: int) -> dict[str, np.ndarray]:
    """Rename CompVis/LDM autoencoder keys (prefix already removed) to diffusers keys; 1x1-conv attention weights
    become Linear weights. Keys no rule knows are kept as they are (the shape check reports them)."""
    out = {}
    for key, value in state.items():
        m = _LDM_UP.match(key)
        if m:
            level = num_levels - 1 - int(m.group(1))  # LDM counts decoder levels from the highest resolution
            inner = f"resnets.{m.group(3)}" if m.group(3) is not None else "upsamplers.0.conv"
            key = f"decoder.up_blocks.{level}.{inner}." + key[m.end():]
        new = _apply(_LDM_TO_DIFFUSERS, key)
        if ".attentions.0.to_" in new and new.endswith(".weight") and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    return out


def _leaf(key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """PyTorch tensor name + layout -> Flax leaf name + layout."""
    module, _, kind = key.rpartition(".")
    if kind == "bias":
        return module + ".bias", value
    if kind == "weight" and value.ndim == 4:  # Conv2d [out, in, kh, kw] -> [kh, kw, in, out]
        return module + ".kernel", value.transpose(2, 3, 1, 0)
    if kind == "weight" and value.ndim == 2:  # Linear [out, in] -> [in, out]
        return module + ".kernel", value.T
    if kind == "weight" and value.ndim == 1:  # GroupNorm
        return module + ".scale", value
    return key, value


def _to_flax_path(key: str) -> str:
    return _apply(_DIFFUSERS_TO_FLAX, "." + key)[1:].replace(".", "/")


def convert_diffusers_vae(state: Mapping[str, np.ndarray], config: VAEConfig,
                          what: str = "diffusers AutoencoderKL") -> dict:
    """diffusers ``AutoencoderKL`` state dict -> nested Flax params, checked against ``config``'s model."""
    expected = param_shapes(config)
    want = flat_shapes(expected)
    converted = {}
    for key, value in as_float32(state).items():
        name, leaf = _leaf(_apply(_DEPRECATED_ATTENTION, "." + key)[1:], value)
        path = _to_flax_path(name)
        # a key that maps nowhere keeps its checkpoint name, so the error shows what the file contains
        converted[path if path in want else key] = leaf
    return validate(converted, expected, what)


def convert_ldm_vae(state: Mapping[str, np.ndarray], config: VAEConfig | None = None,
                    prefix: str = "first_stage_model.") -> dict:
    """The ``prefix``-ed LDM autoencoder keys of a full checkpoint state dict -> Flax params."""
    config = config or VAEConfig.sd14()
    sub = dict(iter_prefixed(state, prefix))
    if not sub:
        raise CheckpointError(f"LDM checkpoint: no keys start with {prefix!r}; is this a VideoCrafter / Stable "
                              f"Diffusion .ckpt?")
    renamed = ldm_to_diffusers_names(sub, len(config.block_out_channels))
    return convert_diffusers_vae(renamed, config, what=f"LDM autoencoder ({prefix}*)")


# ---- entry points ------------------------------------------------------------------------------------------
def load_diffusers_vae(folder: str) -> tuple[VAEConfig, dict]:
    """``(config, params)`` from a diffusers ``vae/`` folder, or a pipeline folder that contains one."""
    if os.path.isfile(os.path.join(folder, "vae", "config.json")):
        folder = os.path.join(folder, "vae")
    config = vae_config_from_diffusers(read_config_json(folder))
    return config, convert_diffusers_vae(read_folder_weights(folder), config, what=f"{folder}")


def load_ldm_vae(checkpoint: str | Mapping[str, np.ndarray], config: VAEConfig | None = None,
                 prefix: str = "first_stage_model.") -> tuple[VAEConfig, dict]:
    """``(config, params)`` from an LDM-style ``.ckpt`` / ``.safetensors`` path or an already loaded state dict."""
    config = config or VAEConfig.sd14()
    state = load_state_dict(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    return config, convert_ldm_vae(state, config, prefix)

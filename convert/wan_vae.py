"""Wan2.1 VAE checkpoints -> Flax params of :mod:`jaxlongvid.models.wan_vae` (a rename table run by
:mod:`convert.rules`).

diffusers ``AutoencoderKLWan`` (a Wan pipeline's ``vae/`` folder) uses the names the Flax model uses:
``{encoder,decoder}.{conv_in, mid_block.{resnets.N, attentions.0}, norm_out, conv_out}``, ``encoder.down_blocks.N``
(residual blocks and resamplers in one list), ``decoder.up_blocks.N.{resnets.M, upsamplers.0}``, a resampler's
``resample.1`` (its 2D conv) and ``time_conv``, ``quant_conv``, ``post_quant_conv``. Norm gains are stored
``[C, 1, 1(, 1)]`` (reshaped to ``[C]``); the attention's 1x1 ``to_qkv`` / ``proj`` convs become Dense layers.

The original release ``Wan2.1_VAE.pth`` (Wan-Video/Wan2.1 ``wan/modules/vae.py``) names the same modules
``{encoder,decoder}.conv1`` (conv_in), ``encoder.downsamples.N``, ``middle.{0,1,2}`` (resnet, attention, resnet),
``head.{0,2}`` (norm_out, conv_out), residual blocks as ``residual.{0,2,3,6}`` (norm1, conv1, norm2, conv2) and
``shortcut``, ``conv1`` / ``conv2`` at the top (quant_conv / post_quant_conv), and the decoder's blocks as one flat
``decoder.upsamples.K`` list: per level ``num_res_blocks + 1`` residual blocks then the upsampler.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

from convert.readers import CheckpointError, read_config_json
from convert.rules import Rules, convert_state, open_checkpoint
from jaxlongvid.models.wan_vae import WanVAEConfig, param_shapes

DIFFUSERS_RULES = Rules(title="Wan VAE (diffusers AutoencoderKLWan)", renames=())
ORIGINAL_RENAMES = (  # applied in order: the top-level conv1 / conv2 first, before block-internal conv1 appears
    (r"^(encoder|decoder)\.conv1\.", r"\1.conv_in."),
    (r"^conv1\.", "quant_conv."),
    (r"^conv2\.", "post_quant_conv."),
    (r"^encoder\.downsamples\.", "encoder.down_blocks."),
    (r"\.middle\.0\.", ".mid_block.resnets.0."),
    (r"\.middle\.1\.", ".mid_block.attentions.0."),
    (r"\.middle\.2\.", ".mid_block.resnets.1."),
    (r"\.head\.0\.", ".norm_out."),
    (r"\.head\.2\.", ".conv_out."),
    (r"\.residual\.0\.", ".norm1."),
    (r"\.residual\.2\.", ".conv1."),
    (r"\.residual\.3\.", ".norm2."),
    (r"\.residual\.6\.", ".conv2."),
    (r"\.shortcut\.", ".conv_shortcut."),
)
FLAT_UPSAMPLES = re.compile(r"^decoder\.upsamples\.(\d+)\.")


def original_rules(config: WanVAEConfig) -> Rules:
    """The release's names; the decoder's flat ``upsamples.K`` becomes ``up_blocks.i.{resnets.j, upsamplers.0}``
    (``num_res_blocks + 2`` entries per level)."""
    per_level = config.num_res_blocks + 2

    def rewrite(key: str) -> Optional[str]:
        m = FLAT_UPSAMPLES.match(key)
        if m is None:
            return key
        level, j = divmod(int(m.group(1)), per_level)
        inner = f"resnets.{j}" if j <= config.num_res_blocks else "upsamplers.0"
        return f"decoder.up_blocks.{level}.{inner}." + key[m.end():]

    return Rules(title="Wan VAE (Wan2.1 release)", renames=ORIGINAL_RENAMES, rewrite=rewrite)


def wan_vae_config_from_diffusers(cfg: Mapping) -> WanVAEConfig:
    """``WanVAEConfig`` from a diffusers ``AutoencoderKLWan`` ``config.json``; Wan2.2's variants are rejected."""
    cls = cfg.get("_class_name", "AutoencoderKLWan")
    if cls != "AutoencoderKLWan":
        raise CheckpointError(f"Wan VAE config: _class_name is {cls!r}; expected AutoencoderKLWan")
    problems = [f"{key}={cfg[key]!r}" for key in ("is_residual", "patch_size", "decoder_base_dim", "attn_scales")
                if cfg.get(key) not in (None, False, [], cfg.get("base_dim") if key == "decoder_base_dim" else None)]
    if problems:
        raise CheckpointError("Wan VAE config not supported (Wan2.1's VAE only): " + ", ".join(problems))
    defaults = WanVAEConfig()
    z_dim = cfg.get("z_dim", defaults.z_dim)
    return WanVAEConfig(base_dim=cfg.get("base_dim", defaults.base_dim), z_dim=z_dim,
                        dim_mult=tuple(cfg.get("dim_mult", defaults.dim_mult)),
                        num_res_blocks=cfg.get("num_res_blocks", defaults.num_res_blocks),
                        temporal_downsample=tuple(cfg.get("temperal_downsample", defaults.temporal_downsample)),
                        latents_mean=tuple(float(v) for v in cfg.get("latents_mean", defaults.latents_mean)),
                        latents_std=tuple(float(v) for v in cfg.get("latents_std", defaults.latents_std)),
                        in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3))


def convert_diffusers_wan_vae(source, config: WanVAEConfig, dtype="float32") -> dict:
    """A diffusers ``AutoencoderKLWan`` checkpoint (file, folder or state dict) -> Flax params."""
    return convert_state(open_checkpoint(source), DIFFUSERS_RULES, param_shapes(config), dtype)


def convert_original_wan_vae(source, config: WanVAEConfig | None = None, dtype="float32") -> dict:
    """The release's ``Wan2.1_VAE.pth`` (or its state dict) -> Flax params (default: the Wan2.1 VAE)."""
    config = config or WanVAEConfig()
    return convert_state(open_checkpoint(source), original_rules(config), param_shapes(config), dtype)


def load_diffusers_wan_vae(folder: str, dtype="float32") -> tuple[WanVAEConfig, dict]:
    """``(config, params)`` from a diffusers ``vae/`` folder."""
    config = wan_vae_config_from_diffusers(read_config_json(folder))
    return config, convert_diffusers_wan_vae(folder, config, dtype)

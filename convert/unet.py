"""PyTorch 3D-UNet checkpoints -> Flax params of :class:`jaxlongvid.models.unet3d.UNet3D`.

Families (one rule table each, kept as data below):

* LaVie base (``lavie_base.pt``: a plain UNet state dict or ``{"ema": ...}``), diffusers-0.16 names;
* VideoCrafter1 / VideoCrafter2 (``model.ckpt``: ``{"state_dict": {"model.diffusion_model.*": ...}}``, LVDM
  ``input_blocks.{k}.{m}`` names, ``temopral_conv`` sic);
* ModelScope / ZeroScope (a diffusers ``unet/`` folder or its state dict).

Each family is a :class:`convert.rules.Rules` value (renames, prefix, the LVDM block rewrite, checked
constants such as LaVie's 16 copies of the shared rotary ``freqs``) run by the one engine in
:mod:`convert.rules`; a checkpoint of another family fails its plan with the family it looks like.

``config`` may be a :class:`UNet3DConfig`, the original constructor kwargs (a dict, a JSON file holding them,
a fixture ``config.json`` with ``constructor_kwargs``, a VideoCrafter inference YAML whose
``model.params.unet_config.params`` holds them, or a diffusers ``config.json``), or None for the released
architecture.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Iterable, Mapping, Optional, Union

import numpy as np

from convert.readers import CheckpointError
from convert.rules import Rules, convert_state, open_checkpoint, plan_conversion  # noqa: F401 (the UNet API)
from jaxlongvid.attention import Encoding
from jaxlongvid.models.unet3d import UNet3DConfig, init_shapes

ConfigLike = Union[None, UNet3DConfig, Mapping, str, os.PathLike]

# ---- renames shared by the families (suffix rules: they also work on a single module's state dict) ----------
ATTENTION_RENAMES = (
    (r"(^|\.)to_out\.0\.", r"\1to_out."),
    (r"(^|\.)ff\.net\.0\.proj\.", r"\1ff.proj."),
    (r"(^|\.)ff\.net\.2\.", r"\1ff.out."),
)
TEMPORAL_CONV_RENAMES = (  # Sequential(GroupNorm, SiLU, [Dropout,] Conv3d) x 4
    (r"(^|\.)conv(\d)\.0\.", r"\1norm\2."),
    (r"(^|\.)conv(\d)\.[23]\.", r"\1conv\2."),
)
SAMPLER_RENAMES = ((r"(^|\.)(down|up)samplers\.0\.(conv|op)\.", r"\1\2samplers.0."),)

LAVIE_RENAMES = ATTENTION_RENAMES + SAMPLER_RENAMES + (
    (r"(^|\.)time_rel_pos_bias\.relative_attention_bias\.weight$", r"\1t5_bias"),
)
MODELSCOPE_RENAMES = ATTENTION_RENAMES + SAMPLER_RENAMES + (
    (r"(^|\.)temp_convs\.(\d+)\.conv(\d)\.0\.", r"\1resnets.\2.temp_conv.norm\3."),
    (r"(^|\.)temp_convs\.(\d+)\.conv(\d)\.[23]\.", r"\1resnets.\2.temp_conv.conv\3."),
)
LVDM_RENAMES = ATTENTION_RENAMES + SAMPLER_RENAMES + (  # VideoCrafter ResBlock / attention internals
    (r"(^|\.)in_layers\.0\.", r"\1norm1."),
    (r"(^|\.)in_layers\.2\.", r"\1conv1."),
    (r"(^|\.)emb_layers\.1\.", r"\1time_emb_proj."),
    (r"(^|\.)out_layers\.0\.", r"\1norm2."),
    (r"(^|\.)out_layers\.3\.", r"\1conv2."),
    (r"(^|\.)skip_connection\.", r"\1conv_shortcut."),
    (r"(^|\.)temopral_conv\.conv(\d)\.0\.", r"\1temp_conv.norm\2."),
    (r"(^|\.)temopral_conv\.conv(\d)\.[23]\.", r"\1temp_conv.conv\2."),
    (r"(^|\.)relative_position_([kv])\.embeddings_table$", r"\1rel_\2"),
)
LVDM_BLOCK = re.compile(r"^(input_blocks\.\d+\.\d+\.|middle_block\.\d+\.|output_blocks\.\d+\.\d+\.|init_attn\.0\."
                        r"|time_embed\.\d+\.|fps_embedding\.\d+\.|out\.\d+\.)")


def lvdm_block_names(config: UNet3DConfig) -> dict[str, str]:
    """VideoCrafter's numbered blocks -> diffusers-style module paths, for ``config``'s layout."""
    names = {"input_blocks.0.0.": "conv_in.", "init_attn.0.": "transformer_in.",
             "time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
             "fps_embedding.0.": "fps_embedding.linear_1.", "fps_embedding.2.": "fps_embedding.linear_2.",
             "out.0.": "conv_norm_out.", "out.2.": "conv_out.",
             "middle_block.0.": "mid_block.resnets.0.", "middle_block.1.": "mid_block.attentions.0.",
             "middle_block.2.": "mid_block.temp_attentions.0.", "middle_block.3.": "mid_block.resnets.1."}

    def layer(block: str, target: str, j: int, attn: bool):
        names[f"{block}.0."] = f"{target}.resnets.{j}."
        if attn:
            names[f"{block}.1."] = f"{target}.attentions.{j}."
            names[f"{block}.2."] = f"{target}.temp_attentions.{j}."

    k = 1
    for level, attn in enumerate(config.attention_levels):
        for j in range(config.layers_per_block):
            layer(f"input_blocks.{k}", f"down_blocks.{level}", j, attn)
            k += 1
        if level != config.num_levels - 1:
            names[f"input_blocks.{k}.0."] = f"down_blocks.{level}.downsamplers.0."
            k += 1
    k = 0
    for i, level in enumerate(reversed(range(config.num_levels))):
        attn = config.attention_levels[level]
        for j in range(config.layers_per_block + 1):
            layer(f"output_blocks.{k}", f"up_blocks.{i}", j, attn)
            if level and j == config.layers_per_block:
                names[f"output_blocks.{k}.{3 if attn else 1}."] = f"up_blocks.{i}.upsamplers.0."
            k += 1
    return names


# ---- family rules ---------------------------------------------------------------------------------------------
FAMILY_TITLES = {"lavie": "LaVie", "videocrafter1": "VideoCrafter1", "videocrafter2": "VideoCrafter2",
                 "videocrafter": "VideoCrafter", "modelscope": "ModelScope"}


def family_rules(family: str, renames, **fields) -> Rules:
    """A UNet family's :class:`Rules`; a failed plan names the family the checkpoint looks like instead."""
    title = FAMILY_TITLES[family]

    def identify(keys) -> str:
        detected = detect_family(keys)
        if detected is None:
            return ""
        if detected.startswith(family) or family.startswith(detected):
            return (f" (it looks like a {title} UNet of another architecture: pass its original constructor "
                    "kwargs as config)")
        return f" (it looks like a {FAMILY_TITLES[detected]} UNet)"

    return Rules(f"{title} UNet", renames, identify=identify, **fields)


def lvdm_rewrite(config: UNet3DConfig):
    """VideoCrafter's numbered blocks renamed by :func:`lvdm_block_names` (None for a block the config lacks)."""
    names = lvdm_block_names(config)

    def rewrite(key: str) -> Optional[str]:
        m = LVDM_BLOCK.match(key)
        if not m:
            return key
        return names[m.group(1)] + key[m.end():] if m.group(1) in names else None

    return rewrite


def _rotary_check(rope_dim: int):
    expected = Encoding(rope_dim=rope_dim).rope_freqs().astype(np.float32)

    def check(value: np.ndarray) -> Optional[str]:
        # Checkpoints are often stored in half precision (LaVie's sample script casts the UNet to fp16): allow
        # its rounding; another theta or rotary width would be off by far more.
        if value.shape != expected.shape or not np.allclose(value, expected, rtol=1e-2, atol=0):
            return (f"rotary freqs {np.asarray(value).ravel()[:4]}... differ from the expected "
                    f"10000 ** (-2k / {rope_dim}) = {expected[:4]}...")
        return None

    return check


def lavie_rules(config: UNet3DConfig) -> Rules:
    return family_rules("lavie", LAVIE_RENAMES,
                        constants=((r"(^|\.)rotary_emb\.freqs$", _rotary_check(config.rope_dim or 32)),))


def videocrafter_rules(config: UNet3DConfig, version: int) -> Rules:
    return family_rules(f"videocrafter{version}", LVDM_RENAMES, prefix="model.diffusion_model.",
                        rewrite=lvdm_rewrite(config))


def modelscope_rules(config: UNet3DConfig) -> Rules:
    return family_rules("modelscope", MODELSCOPE_RENAMES)


def detect_family(keys: Iterable[str]) -> Optional[str]:
    """Which original a UNet state dict comes from, judged by its key names (None: none of ours)."""
    keys = list(keys)
    has = lambda s: any(s in k for k in keys)
    if has("input_blocks.") and has("middle_block."):
        if has("temopral_conv.") or has("fps_embedding."):
            return "videocrafter2"
        return "videocrafter1" if has("relative_position_k.") else "videocrafter"
    if has(".attn_temp.") or has("time_rel_pos_bias."):
        return "lavie"
    if has("transformer_in.") or has("temp_convs."):
        return "modelscope"
    return None


# ---- original constructor kwargs -> UNet3DConfig ----------------------------------------------------------------
def _read_structured(path: str):
    with open(path) as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            return yaml.safe_load(f)
        return json.load(f)


def original_kwargs(config: ConfigLike) -> Union[None, UNet3DConfig, dict]:
    """Normalise ``config`` to None, a UNet3DConfig, or the original constructor kwargs (a dict)."""
    if config is None or isinstance(config, UNet3DConfig):
        return config
    where = ""
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        where = f"{path}: "
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: config file not found")
        try:
            config = _read_structured(path)
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable JSON/YAML config ({e})") from None
    if not isinstance(config, Mapping):
        raise CheckpointError(f"config must be a mapping of constructor kwargs, got {type(config).__name__}")
    if "constructor_kwargs" in config:  # a fixture config.json
        return dict(config["constructor_kwargs"])
    if "model" in config:  # a VideoCrafter inference YAML
        try:
            return dict(config["model"]["params"]["unet_config"]["params"])
        except (KeyError, TypeError):
            raise CheckpointError(f"{where}config has 'model' but no model.params.unet_config.params") from None
    if "temporal_layout" in config:  # our own UNet3DConfig.to_dict()
        return UNet3DConfig.from_dict(dict(config))
    return dict(config)


def _take(kwargs: Mapping, defaults: Mapping, what: str, ignored: Iterable[str] = ()) -> dict:
    unknown = sorted(set(kwargs) - set(defaults) - set(ignored) - {k for k in kwargs if k.startswith("_")})
    if unknown:
        raise CheckpointError(f"{what} config: unknown constructor arguments {unknown}")
    return {**defaults, **{k: v for k, v in kwargs.items() if k in defaults}}


def _require(what: str, kw: Mapping, supported: Mapping):
    bad = [f"{k}={kw[k]!r} (supported: {v!r})" for k, v in supported.items() if kw[k] != v]
    if bad:
        raise CheckpointError(f"{what} config: not supported by this port: {', '.join(bad)}")


def _per_level(value, levels: int, what: str, name: str) -> tuple:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels
    if len(values) != levels:
        raise CheckpointError(f"{what} config: {name} needs one entry per level ({levels}), got {value!r}")
    return values


def _diffusers_attention_levels(kw: Mapping, what: str) -> tuple[bool, ...]:
    down, up = list(kw["down_block_types"]), list(kw["up_block_types"])
    kinds = {"CrossAttnDownBlock3D": True, "DownBlock3D": False}
    if any(t not in kinds for t in down):
        raise CheckpointError(f"{what} config: down_block_types {down} (supported: {sorted(kinds)})")
    levels = tuple(kinds[t] for t in down)
    mirror = ["CrossAttnUpBlock3D" if a else "UpBlock3D" for a in reversed(levels)]
    if up != mirror:
        raise CheckpointError(f"{what} config: up_block_types {up} must mirror the down blocks: {mirror}")
    if len(kw["block_out_channels"]) != len(down):
        raise CheckpointError(f"{what} config: block_out_channels needs one entry per down block")
    return levels


LAVIE_DEFAULTS = dict(
    in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",), mid_block_type="UNetMidBlock3DCrossAttn",
    up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3, only_cross_attention=False,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280, attention_head_dim=8,
    dual_cross_attention=False, use_linear_projection=False, class_embed_type=None, num_class_embeds=None,
    upcast_attention=False, resnet_time_scale_shift="default", use_first_frame=False, use_relative_position=False)


def lavie_config(kwargs: Mapping) -> UNet3DConfig:
    """LaVie ``UNet3DConditionModel(**kwargs)`` -> UNet3DConfig (``attention_head_dim`` = heads per level)."""
    what = "LaVie UNet"
    kw = _take(kwargs, LAVIE_DEFAULTS, what, ignored=("sample_size",))
    _require(what, kw, dict(center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
                            mid_block_type="UNetMidBlock3DCrossAttn", only_cross_attention=False,
                            downsample_padding=1, mid_block_scale_factor=1, act_fn="silu",
                            dual_cross_attention=False, class_embed_type=None, num_class_embeds=None,
                            resnet_time_scale_shift="default", use_first_frame=False, use_relative_position=False))
    levels = _diffusers_attention_levels(kw, what)
    return UNet3DConfig(
        family="lavie", in_channels=kw["in_channels"], out_channels=kw["out_channels"],
        block_channels=tuple(kw["block_out_channels"]), layers_per_block=kw["layers_per_block"],
        attention_levels=levels, attention_heads=_per_level(kw["attention_head_dim"], len(levels), what,
                                                            "attention_head_dim"),
        cross_attention_dim=kw["cross_attention_dim"], norm_groups=kw["norm_num_groups"], norm_eps=kw["norm_eps"])


MODELSCOPE_DEFAULTS = dict(
    in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
    up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3, block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=1024, attention_head_dim=64, num_attention_heads=None,
    time_cond_proj_dim=None)


def modelscope_config(kwargs: Mapping) -> UNet3DConfig:
    """diffusers ``UNet3DConditionModel(**kwargs)`` -> UNet3DConfig (``attention_head_dim`` = head width)."""
    what = "ModelScope UNet"
    kw = _take(kwargs, MODELSCOPE_DEFAULTS, what, ignored=("sample_size",))
    _require(what, kw, dict(downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", num_attention_heads=None,
                            time_cond_proj_dim=None))
    levels = _diffusers_attention_levels(kw, what)
    head_dim = kw["attention_head_dim"]
    if not isinstance(head_dim, int) or kw["norm_num_groups"] is None:
        raise CheckpointError(f"{what} config: attention_head_dim must be one int and norm_num_groups set")
    channels = tuple(kw["block_out_channels"])
    return UNet3DConfig(
        family="modelscope", in_channels=kw["in_channels"], out_channels=kw["out_channels"],
        block_channels=channels, layers_per_block=kw["layers_per_block"], attention_levels=levels,
        attention_heads=tuple(ch // head_dim for ch in channels), cross_attention_dim=kw["cross_attention_dim"],
        norm_groups=kw["norm_num_groups"], norm_eps=kw["norm_eps"], temporal_layout="transformer",
        frame_pooled_resnet_norm=False, temporal_conv=True, temporal_in=True, temporal_in_heads=8,
        temporal_in_head_dim=head_dim, rope_dim=0, t5_buckets=0)


VIDEOCRAFTER_DEFAULTS = dict(
    in_channels=None, model_channels=None, out_channels=None, num_res_blocks=None, attention_resolutions=None,
    dropout=0.0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2, context_dim=None,
    use_scale_shift_norm=False, resblock_updown=False, num_heads=-1, num_head_channels=-1, transformer_depth=1,
    use_linear=False, use_checkpoint=False, temporal_conv=False, tempspatial_aware=False, temporal_attention=True,
    temporal_selfatt_only=True, use_relative_position=True, use_causal_attention=False, temporal_length=None,
    use_fp16=False, addition_attention=False, use_image_attention=False, temporal_transformer_depth=1,
    fps_cond=False)


def videocrafter_config(kwargs: Mapping, version: int) -> UNet3DConfig:
    """LVDM ``UNetModel(**kwargs)`` (VideoCrafter's ``unet_config.params``) -> UNet3DConfig."""
    what = f"VideoCrafter{version} UNet"
    kw = _take(kwargs, VIDEOCRAFTER_DEFAULTS, what)
    missing = [k for k, v in kw.items() if v is None and k in ("in_channels", "model_channels", "out_channels",
                                                                   "num_res_blocks", "attention_resolutions",
                                                                   "context_dim")]
    if missing:
        raise CheckpointError(f"{what} config: missing required arguments {missing}")
    _require(what, kw, dict(conv_resample=True, dims=2, use_scale_shift_norm=False, resblock_updown=False,
                            tempspatial_aware=False, temporal_attention=True, temporal_selfatt_only=True,
                            use_causal_attention=False, use_image_attention=False))
    if bool(kw["temporal_conv"]) != (version == 2):
        raise CheckpointError(f"{what} config: temporal_conv={kw['temporal_conv']} does not match version {version} "
                              "(VideoCrafter2 has temporal convs, VideoCrafter1 does not)")
    if kw["temporal_transformer_depth"] != kw["transformer_depth"]:
        raise CheckpointError(f"{what} config: transformer_depth and temporal_transformer_depth must be equal")
    channels = tuple(kw["model_channels"] * m for m in kw["channel_mult"])
    nhc = kw["num_head_channels"]
    heads = tuple(ch // nhc for ch in channels) if nhc != -1 else (kw["num_heads"],) * len(channels)
    if kw["addition_attention"] and nhc == -1:
        raise CheckpointError(f"{what} config: addition_attention needs num_head_channels")
    relative = kw["use_relative_position"]
    if relative and kw["temporal_length"] is None:
        raise CheckpointError(f"{what} config: use_relative_position needs temporal_length")
    return UNet3DConfig(
        family=f"videocrafter{version}", in_channels=kw["in_channels"], out_channels=kw["out_channels"],
        block_channels=channels, layers_per_block=kw["num_res_blocks"],
        attention_levels=tuple(2 ** level in kw["attention_resolutions"] for level in range(len(channels))),
        attention_heads=heads, cross_attention_dim=kw["context_dim"], transformer_depth=kw["transformer_depth"],
        norm_groups=32, norm_eps=1e-5, temporal_layout="transformer", frame_pooled_resnet_norm=False,
        temporal_conv=kw["temporal_conv"], temporal_in=kw["addition_attention"], temporal_in_heads=8,
        temporal_in_head_dim=max(nhc, 1), fps_conditioning=kw["fps_cond"], rope_dim=0, t5_buckets=0,
        rel_distance=kw["temporal_length"] if relative else 0, native_frames=kw["temporal_length"] or 16)


def _resolve_config(config: ConfigLike, preset: UNet3DConfig, from_kwargs: Callable[[dict], UNet3DConfig]):
    value = original_kwargs(config)
    if value is None:
        return preset
    if isinstance(value, UNet3DConfig):
        return value
    try:
        return from_kwargs(value)
    except CheckpointError as e:
        if not isinstance(config, (str, os.PathLike)):
            raise
        raise CheckpointError(f"{os.fspath(config)}: {e}") from None  # name the file the arguments came from


def check_json_config(config: ConfigLike, what: str) -> None:
    """Refuse a config file that is not JSON (by name or content) for a family whose configs are JSON only."""
    if not isinstance(config, (str, os.PathLike)) or not os.path.isfile(config):
        return
    path = os.fspath(config)
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except (ValueError, OSError):
        kind = "a YAML file" if path.endswith((".yaml", ".yml")) else "not JSON"
        raise CheckpointError(f"{path}: {kind}; {what}") from None


# ---- public entry points ------------------------------------------------------------------------------------------
def convert_lavie_unet(path, config: ConfigLike = None) -> tuple[UNet3DConfig, dict]:
    """LaVie ``lavie_base.pt`` (or a safetensors copy / in-memory state dict) -> ``(config, params)``.
    ``config``: a JSON file or mapping of the UNet's constructor arguments (its diffusers-style config.json)."""
    check_json_config(config, "the LaVie UNet config must be a JSON file of the UNet's constructor arguments (its "
                              "diffusers-style config.json: in_channels, block_out_channels, ...); LaVie's own "
                              "sampling YAML is not needed, leave --config out for the released architecture")
    cfg = _resolve_config(config, UNet3DConfig.lavie(), lavie_config)
    return cfg, convert_state(open_checkpoint(path), lavie_rules(cfg), init_shapes(cfg))


def convert_videocrafter_unet(path, version: int, config: ConfigLike = None) -> tuple[UNet3DConfig, dict]:
    """VideoCrafter ``model.ckpt`` (the ``model.diffusion_model.*`` keys; others are left to the VAE / text
    converters) -> ``(config, params)``. ``version``: 1 or 2."""
    if str(version) not in ("1", "2"):
        raise ValueError(f"VideoCrafter version must be 1 or 2, got {version!r}")
    version = int(version)
    preset = UNet3DConfig.videocrafter1() if version == 1 else UNet3DConfig.videocrafter2()
    cfg = _resolve_config(config, preset, lambda kw: videocrafter_config(kw, version))
    return cfg, convert_state(open_checkpoint(path), videocrafter_rules(cfg, version), init_shapes(cfg))


DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")


def convert_modelscope_unet(source, config: ConfigLike = None) -> tuple[UNet3DConfig, dict]:
    """A diffusers ``unet/`` folder (its ``config.json`` is used when ``config`` is None), a weights file, or a
    state dict of ``UNet3DConditionModel`` -> ``(config, params)``."""
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        folder = os.fspath(source)
        if config is None and os.path.isfile(os.path.join(folder, "config.json")):
            config = os.path.join(folder, "config.json")
        files = [os.path.join(folder, n) for n in DIFFUSERS_WEIGHTS if os.path.isfile(os.path.join(folder, n))]
        if not files:
            raise CheckpointError(f"{folder}: no weights file; looked for {', '.join(DIFFUSERS_WEIGHTS)}")
        source = files[0]
    cfg = _resolve_config(config, UNet3DConfig.modelscope(), modelscope_config)
    return cfg, convert_state(open_checkpoint(source), modelscope_rules(cfg), init_shapes(cfg))

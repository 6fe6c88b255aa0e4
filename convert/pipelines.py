"""Original checkpoints -> saved jaxlongvid pipelines (``jaxlongvid convert FAMILY ... --out DIR``).

Each ``convert_*`` function converts every component its input holds, builds a
:class:`~jaxlongvid.pipeline.Pipeline` with the original's sampling settings, and only then saves it
(``jaxlongvid.pipeline.save`` writes a temporary sibling and renames it into place), so a failed conversion leaves
nothing at ``out``. Bad input raises one :class:`CheckpointError` (a ``ValueError``) naming the file and its first
problems, on one line; the CLI prints it and exits 1.

* LaVie: the UNet from ``lavie_base.pt``; with ``sd`` (a diffusers Stable Diffusion 1.4 folder) also the VAE,
  the CLIP ViT-L/14 text encoder and its tokenizer.
* VideoCrafter1/2: UNet (``model.diffusion_model.*``), VAE (``first_stage_model.*``) and OpenCLIP ViT-H/14 text
  tower (``cond_stage_model.model.*``) from the one ``model.ckpt``, which is opened once (memory-mapped, or
  safetensors read tensor by tensor); the tokenizer is OpenCLIP's ``bpe_simple_vocab_16e6.txt.gz``.
* ModelScope / ZeroScope: a diffusers text-to-video folder (``unet/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/``).
* Wan2.1 text-to-video: a diffusers folder (``transformer/``, ``vae/``, ``text_encoder/`` + ``tokenizer/``,
  ``scheduler/``) or the original release folder (``config.json`` + ``diffusion_pytorch_model*.safetensors``,
  ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``, ``google/umt5-xxl/``).

A component the input lacks is left out and listed in ``PipelineConfig.missing``: such a denoiser-only pipeline
runs ``pipe.denoiser`` but ``jaxlongvid.sample`` refuses it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Callable, Mapping, Optional, Union

import numpy as np

from convert.readers import CheckpointError, read_json
from convert.text import convert_openclip_text, load_hf_text_encoder
from convert.unet import (ConfigLike, convert_lavie_unet, convert_modelscope_unet, convert_state, open_checkpoint,
                          original_kwargs, videocrafter_config, videocrafter_rules)
from convert.umt5 import convert_original_umt5, load_hf_umt5
from convert.vae import convert_ldm_vae, load_diffusers_vae
from convert.wan import convert_transformer_folder
from convert.wan_vae import convert_original_wan_vae, load_diffusers_wan_vae
from jaxlongvid import pipeline as pipeline_lib
from jaxlongvid.models.text import TextConfig
from jaxlongvid.models.tokenizers import CLIPTokenizer, UMT5Tokenizer
from jaxlongvid.models.umt5 import UMT5Config
from jaxlongvid.models.unet3d import UNet3DConfig, init_shapes
from jaxlongvid.models.vae import VAEConfig
from jaxlongvid.models.wan import WanConfig
from jaxlongvid.models.wan_vae import WanVAEConfig
from jaxlongvid.pipeline import Pipeline, PipelineConfig
from jaxlongvid.schedulers import SchedulerConfig, alphas_cumprod

PathLike = Union[str, os.PathLike]
OPENCLIP_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
VC_VAE, VC_TEXT = "first_stage_model.", "cond_stage_model.model."  # (the UNet's: videocrafter_rules)

# the originals' sampling settings (their sample scripts / configs; see jaxlongvid.schedulers for the schedulers)
LAVIE_DEFAULTS = dict(num_frames=16, num_inference_steps=50, guidance_scale=7.5, height=320, width=512)
VIDEOCRAFTER_DEFAULTS = dict(num_frames=16, num_inference_steps=50, guidance_scale=12.0, height=320, width=512)
MODELSCOPE_DEFAULTS = dict(num_frames=16, num_inference_steps=50, guidance_scale=9.0)  # diffusers' pipeline call
# Wan2.1 T2V: diffusers' WanPipeline call (480x832, 81 frames, 50 steps, guidance 5; the original's generate.py
# samples the same counts with its flow shift 5). The original's default negative prompt is not carried over:
# like diffusers, the default is the empty prompt.
WAN_DEFAULTS = dict(num_frames=81, num_inference_steps=50, guidance_scale=5.0, height=480, width=832)
WAN_ORIGINAL_SHIFT = 5.0  # generate.py's sample_shift for text-to-video


# ---- public entry points ----------------------------------------------------------------------------------------
def convert_lavie(unet: PathLike, sd: Optional[PathLike] = None, config: ConfigLike = None, *, out: PathLike,
                  overwrite: bool = False, scheduler: str = "ddim") -> str:
    """LaVie base -> a pipeline directory at ``out`` (returned, absolute). See :func:`lavie_pipeline`."""
    return _convert_and_save(lambda: lavie_pipeline(unet, sd, config, scheduler=scheduler), out, overwrite)


def convert_videocrafter(ckpt: PathLike, version: int, config: ConfigLike = None, *, out: PathLike,
                         overwrite: bool = False, vocab: Optional[PathLike] = None,
                         vae_config: Optional[VAEConfig] = None, text_config: Optional[TextConfig] = None) -> str:
    """VideoCrafter1/2 ``model.ckpt`` -> a pipeline directory at ``out``. See :func:`videocrafter_pipeline`."""
    return _convert_and_save(lambda: videocrafter_pipeline(ckpt, version, config, vocab=vocab, vae_config=vae_config,
                                                           text_config=text_config), out, overwrite)


def convert_modelscope(diffusers: PathLike, *, out: PathLike, overwrite: bool = False) -> str:
    """A diffusers text-to-video folder -> a pipeline directory at ``out``. See :func:`modelscope_pipeline`."""
    return _convert_and_save(lambda: modelscope_pipeline(diffusers), out, overwrite)


def convert_wan(diffusers: Optional[PathLike] = None, original: Optional[PathLike] = None, *, out: PathLike,
                overwrite: bool = False) -> str:
    """Wan2.1 text-to-video from a diffusers folder or the original release folder (exactly one) -> a pipeline
    directory at ``out``. See :func:`wan_diffusers_pipeline` and :func:`wan_original_pipeline`."""
    if (diffusers is None) == (original is None):
        raise CheckpointError("give exactly one of --diffusers DIR and --original DIR")
    if diffusers is not None:
        return _convert_and_save(lambda: wan_diffusers_pipeline(diffusers), out, overwrite)
    return _convert_and_save(lambda: wan_original_pipeline(original), out, overwrite)


def _convert_and_save(build: Callable[[], Pipeline], out: PathLike, overwrite: bool) -> str:
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not overwrite:  # before the slow part
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    pipeline_lib.check_target(out, overwrite)  # never replaces anything but a pipeline
    try:
        pipe = build()
    except CheckpointError as e:
        raise CheckpointError(_one_line(str(e))) from e
    from flax.traverse_util import flatten_dict

    bad = pipeline_lib.nonfinite_leaves({"/".join(k): v for k, v in flatten_dict(pipe.params).items()})
    if bad:
        raise CheckpointError(f"{out}: not written: the checkpoint has non-finite weights (NaN or Inf) in "
                              f"{len(bad)} leaves: {', '.join(bad[:10])}{', ...' if len(bad) > 10 else ''}")
    return pipeline_lib.save(pipe, out, overwrite=overwrite)


def _one_line(message: str) -> str:
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


# ---- LaVie -------------------------------------------------------------------------------------------------------
def lavie_pipeline(unet, sd: Optional[PathLike] = None, config: ConfigLike = None, *,
                   scheduler: str = "ddim") -> Pipeline:
    """LaVie base: the UNet from ``unet`` (``lavie_base.pt``, a safetensors copy or a state dict; ``config``
    overrides the released architecture), and with ``sd`` (a diffusers Stable Diffusion 1.4 folder with ``vae/``,
    ``text_encoder/``, ``tokenizer/``) the VAE, text encoder and tokenizer. Without ``sd`` the pipeline is
    denoiser-only.

    Sampling defaults: 16 frames, 320x512, 50 steps, guidance 7.5, ``SchedulerConfig.lavie(scheduler)``. DDIM
    (eta 0) is the default here; LaVie's shipped ``sample.yaml`` samples with DDPM, selectable with
    ``scheduler="ddpm"``.
    """
    unet_config, unet_params = convert_lavie_unet(unet, config)
    components = _diffusers_components(sd) if sd is not None else {}
    sources = {"unet": _describe(unet), **({"sd": os.path.abspath(os.fspath(sd))} if sd is not None else {})}
    return assemble("lavie", unet_config, unet_params, SchedulerConfig.lavie(scheduler), LAVIE_DEFAULTS,
                    sources=sources, **components)


# ---- VideoCrafter ------------------------------------------------------------------------------------------------
def videocrafter_pipeline(ckpt: PathLike, version: int, config: ConfigLike = None, *,
                          vocab: Optional[PathLike] = None, vae_config: Optional[VAEConfig] = None,
                          text_config: Optional[TextConfig] = None) -> Pipeline:
    """VideoCrafter1 (``version=1``) or VideoCrafter2 (``version=2``) from one ``model.ckpt`` (or safetensors).

    ``config``: the inference YAML (``configs/inference_t2v_512_v*.yaml``: UNet arguments, the VAE's ``ddconfig``
    and ``scale_factor``, the text tower's ``layer``), a JSON file / dict of the UNet's constructor arguments, a
    ``UNet3DConfig``, or None for the released architecture. ``vae_config`` / ``text_config`` override the VAE
    and text tower architectures (default: SD's KL-f8 VAE and OpenCLIP ViT-H/14 "penultimate"). ``vocab``:
    OpenCLIP's ``bpe_simple_vocab_16e6.txt.gz``; by default looked for next to ``ckpt``, then in an installed
    ``open_clip`` package. The VAE and text tower are converted when the checkpoint holds them; a text tower
    needs the vocabulary.

    Sampling defaults: 16 frames, 320x512, 50 DDIM steps with eta 1, guidance 12, fps 28 (v2),
    ``SchedulerConfig.videocrafter()``.
    """
    if str(version) not in ("1", "2"):
        raise CheckpointError(f"VideoCrafter version must be 1 or 2, got {version!r}")
    version = int(version)
    settings = _ldm_settings(config)
    unet_config = _videocrafter_unet_config(config, version)
    vae_config = vae_config or settings.get("vae") or VAEConfig.sd14()
    text_config = text_config or settings.get("text") or TextConfig.openclip_vit_h14()
    scheduler = SchedulerConfig.videocrafter()

    source = open_checkpoint(ckpt)  # the one read: tensors come from the file as each is converted
    name = source.name
    unet_params = convert_state(source, videocrafter_rules(unet_config, version), init_shapes(unet_config))
    _check_noise_schedule(source, scheduler, f"VideoCrafter{version}")
    components = {}
    vae_state = _take_prefixed(source, VC_VAE)
    if vae_state:
        components.update(vae_config=vae_config, vae_params=_named(name, convert_ldm_vae, vae_state, vae_config))
    text_state = _take_prefixed(source, VC_TEXT)
    if text_state:
        text_params = _named(name, convert_openclip_text, text_state, text_config)
        components.update(text_config=text_config, text_params=text_params,
                          tokenizer=_openclip_tokenizer(name, vocab, text_config))
    del source, vae_state, text_state
    defaults = dict(VIDEOCRAFTER_DEFAULTS, fps=28 if unet_config.fps_conditioning else None)
    return assemble(f"videocrafter{version}", unet_config, unet_params, scheduler, defaults,
                    sources={"ckpt": os.path.abspath(name)}, **components)


def _videocrafter_unet_config(config: ConfigLike, version: int) -> UNet3DConfig:
    value = original_kwargs(config)
    if value is None:
        return UNet3DConfig.videocrafter1() if version == 1 else UNet3DConfig.videocrafter2()
    return value if isinstance(value, UNet3DConfig) else videocrafter_config(value, version)


def _ldm_settings(config: ConfigLike) -> dict:
    """The VAE and text-tower configs an LDM inference YAML (or its dict) implies; {} for other configs."""
    what = os.fspath(config) if isinstance(config, (str, os.PathLike)) else "config"
    if isinstance(config, (str, os.PathLike)):
        if not os.path.isfile(config):
            return {}  # the UNet config reader reports it
        if not what.endswith((".yaml", ".yml")):
            config = read_json(what)
        else:
            import yaml

            try:
                with open(what, encoding="utf-8") as f:
                    config = yaml.safe_load(f)
            except (OSError, yaml.YAMLError) as e:
                raise CheckpointError(f"{what}: not a readable YAML config ({_one_line(str(e))})") from None
    if not isinstance(config, Mapping) or not isinstance(config.get("model"), Mapping):
        return {}
    params = config["model"].get("params") or {}
    settings = {}
    first_stage = (params.get("first_stage_config") or {}).get("params")
    if first_stage:
        settings["vae"] = _ldm_vae_config(first_stage, params.get("scale_factor", 0.18215), what)
    cond_stage = (params.get("cond_stage_config") or {}).get("params") or {}
    if cond_stage:
        settings["text"] = _openclip_text_config(cond_stage, what)
    return settings


def _ldm_vae_config(first_stage: Mapping, scale_factor: float, what: str) -> VAEConfig:
    """LDM ``AutoencoderKL(ddconfig, embed_dim)`` -> VAEConfig (the diffusers-equivalent architecture)."""
    dd = first_stage.get("ddconfig") or {}
    try:
        z, channels, layers = dd["z_channels"], tuple(dd["ch"] * m for m in dd["ch_mult"]), dd["num_res_blocks"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{what}: first_stage_config.params.ddconfig is incomplete ({e!r})") from None
    problems = [f"{k}={v!r}" for k, v, ok in (("attn_resolutions", dd.get("attn_resolutions"),
                                               not dd.get("attn_resolutions")),
                                              ("double_z", dd.get("double_z", True), dd.get("double_z", True)),
                                              ("embed_dim", first_stage.get("embed_dim", z),
                                               first_stage.get("embed_dim", z) == z)) if not ok]
    if problems:
        raise CheckpointError(f"{what}: first_stage_config not supported: {', '.join(problems)} (need no "
                              f"attention resolutions, double_z, embed_dim == z_channels)")
    try:
        return VAEConfig(in_channels=dd.get("in_channels", 3), out_channels=dd.get("out_ch", 3), latent_channels=z,
                         block_out_channels=channels, layers_per_block=layers, scaling_factor=float(scale_factor))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what}: first_stage_config: {e}") from None


def _openclip_text_config(cond_stage: Mapping, what: str) -> TextConfig:
    arch, layer = cond_stage.get("arch", "ViT-H-14"), cond_stage.get("layer", "last")
    if arch != "ViT-H-14" or layer not in ("last", "penultimate"):
        raise CheckpointError(f"{what}: cond_stage_config arch={arch!r}, layer={layer!r} not supported (need "
                              f"ViT-H-14 with layer 'last' or 'penultimate'; pass text_config for other towers)")
    return dataclasses.replace(TextConfig.openclip_vit_h14(), skip_last_layers=1 if layer == "penultimate" else 0)


def _take_prefixed(source, prefix: str) -> dict[str, np.ndarray]:
    """The tensors under ``prefix`` (each read from the file once; memory-mapped ones are not copied)."""
    return {k: np.asarray(source.take(k)) for k in list(source.shapes) if k.startswith(prefix)}


def _check_noise_schedule(source, scheduler: SchedulerConfig, title: str) -> None:
    """An LDM checkpoint stores its training ``alphas_cumprod``: it must be the schedule we sample with."""
    if "alphas_cumprod" not in source.shapes:
        return
    got = np.asarray(source.take("alphas_cumprod"), np.float64)
    want = alphas_cumprod(scheduler).astype(np.float64)
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=0):
        raise CheckpointError(f"{source.name}: its alphas_cumprod (the training noise schedule) differs from "
                              f"{title}'s (sqrt-linear betas {scheduler.beta_start}..{scheduler.beta_end}, "
                              f"{scheduler.num_train_timesteps} steps)")


def _openclip_tokenizer(ckpt: str, vocab: Optional[PathLike], text_config: TextConfig) -> CLIPTokenizer:
    path = _find_openclip_vocab(ckpt, vocab)
    if path is None:
        raise CheckpointError(
            f"{ckpt}: holds the OpenCLIP text tower but no tokenizer vocabulary was found: put {OPENCLIP_VOCAB} "
            f"(shipped inside the open_clip_torch package) next to the checkpoint or pass its path (--vocab, vocab=)")
    try:
        return CLIPTokenizer.from_openclip_bpe(path, context_length=text_config.context_length)
    except (OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable OpenCLIP BPE vocabulary ({_one_line(str(e))})") from None


def _find_openclip_vocab(ckpt: str, vocab: Optional[PathLike]) -> Optional[str]:
    if vocab is not None:
        if not os.path.isfile(vocab):
            raise CheckpointError(f"{os.fspath(vocab)}: no such vocabulary file")
        return os.fspath(vocab)
    candidates = [os.path.join(os.path.dirname(os.path.abspath(ckpt)), OPENCLIP_VOCAB)]
    spec = importlib.util.find_spec("open_clip")  # finds the installed package without importing it
    if spec is not None and spec.submodule_search_locations:
        candidates += [os.path.join(p, OPENCLIP_VOCAB) for p in spec.submodule_search_locations]
    return next((p for p in candidates if os.path.isfile(p)), None)


# ---- ModelScope --------------------------------------------------------------------------------------------------
T2V_PIPELINES = ("TextToVideoSDPipeline", "VideoToVideoSDPipeline")


def diffusers_folder(diffusers: PathLike, pipelines, what: str) -> str:
    """``diffusers`` as a folder path, refused unless it exists and its ``model_index.json`` (if any) names one of
    ``pipelines`` (``what``: the kind of pipeline, for the message)."""
    folder = os.fspath(diffusers)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such diffusers folder")
    index = os.path.join(folder, "model_index.json")
    if os.path.isfile(index):
        cls = read_json(index).get("_class_name")
        if cls not in pipelines:
            raise CheckpointError(f"{index}: a {cls} folder, not a {what} one ({', '.join(pipelines)})")
    return folder


def modelscope_pipeline(diffusers: PathLike) -> Pipeline:
    """ModelScope T2V / ZeroScope in diffusers format: ``unet/`` (required), ``vae/``, ``text_encoder/`` with
    ``tokenizer/``, ``scheduler/`` (its noise-schedule fields override ``SchedulerConfig.modelscope()``'s).

    Sampling defaults: 16 frames, 50 steps, guidance 9, size = the UNet's ``sample_size`` x the VAE factor (what
    diffusers' ``TextToVideoSDPipeline`` uses when none is given; 256x256 for ModelScope).
    """
    folder = diffusers_folder(diffusers, T2V_PIPELINES, "text-to-video")
    if not os.path.isdir(os.path.join(folder, "unet")):
        raise CheckpointError(f"{folder}: no unet/ folder (expected a diffusers text-to-video pipeline folder)")
    unet_config, unet_params = convert_modelscope_unet(os.path.join(folder, "unet"))
    components = _diffusers_components(folder, required=False)
    scheduler = _diffusers_scheduler(os.path.join(folder, "scheduler", "scheduler_config.json"),
                                     SchedulerConfig.modelscope())
    unet_json = os.path.join(folder, "unet", "config.json")
    sample_size = read_json(unet_json).get("sample_size", 32) if os.path.isfile(unet_json) else 32
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    factor = components["vae_config"].downsample_factor if "vae_config" in components else 8
    defaults = dict(MODELSCOPE_DEFAULTS, height=height * factor, width=width * factor)
    return assemble("modelscope", unet_config, unet_params, scheduler, defaults,
                    sources={"diffusers": os.path.abspath(folder)}, **components)


def _diffusers_scheduler(path: str, preset: SchedulerConfig) -> SchedulerConfig:
    if not os.path.isfile(path):
        return preset
    cfg = read_json(path)
    unsupported = [f"{k}={cfg[k]!r}" for k, ok in (("trained_betas", None), ("thresholding", False),
                                                   ("rescale_betas_zero_snr", False)) if cfg.get(k, ok) != ok]
    if unsupported:
        raise CheckpointError(f"{path}: not supported: {', '.join(unsupported)}")
    fields = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "steps_offset",
              "set_alpha_to_one", "clip_sample", "clip_sample_range", "timestep_spacing")
    try:
        return preset.replace(**{k: cfg[k] for k in fields if k in cfg})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


# ---- shared pieces -----------------------------------------------------------------------------------------------
def _diffusers_components(folder: PathLike, required: bool = True) -> dict:
    """VAE, CLIP text encoder and tokenizer of a diffusers pipeline folder (``vae/``, ``text_encoder/``,
    ``tokenizer/``). ``required``: all three must be there (else each present one is taken; the text encoder
    and tokenizer only together)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such diffusers folder")
    present = {sub: os.path.isdir(os.path.join(folder, sub)) for sub in ("vae", "text_encoder", "tokenizer")}
    absent = [sub + "/" for sub, ok in present.items() if not ok]
    if absent and (required or present["text_encoder"] != present["tokenizer"]):
        raise CheckpointError(f"{folder}: no {', '.join(absent)} folder (a diffusers pipeline folder has vae/, "
                              f"text_encoder/ and tokenizer/)")
    out = {}
    if present["vae"]:
        out["vae_config"], out["vae_params"] = load_diffusers_vae(os.path.join(folder, "vae"))
    if present["text_encoder"]:
        out["text_config"], out["text_params"] = load_hf_text_encoder(os.path.join(folder, "text_encoder"))
        tokenizer_dir = os.path.join(folder, "tokenizer")
        try:
            out["tokenizer"] = CLIPTokenizer.from_hf_dir(tokenizer_dir)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{tokenizer_dir}: not a usable CLIP tokenizer folder ({_one_line(str(e))})") \
                from None
    return out


def pipeline_of_parts(family: str, denoiser_config, denoiser_params: dict, scheduler: SchedulerConfig,
                      defaults: Mapping, problems: list[str], where: str, *, vae_config=None,
                      vae_params: Optional[dict] = None, text_config=None, text_params: Optional[dict] = None,
                      tokenizer=None, sources: Optional[Mapping[str, str]] = None) -> Pipeline:
    """The Pipeline of converted components once ``problems`` (what does not fit together) is empty, else one
    error naming them all; absent VAE / text parts are listed in ``missing``."""
    if problems:
        raise CheckpointError(f"{where}: the components do not fit together: {'; '.join(problems)}")
    params = {"unet": denoiser_params}
    if vae_config is not None:
        params["vae"] = vae_params
    if text_config is not None:
        params["text"] = text_params
    missing = tuple(name for name, cfg in (("vae", vae_config), ("text", text_config)) if cfg is None)
    config = PipelineConfig(family=family, unet=denoiser_config, text=text_config, vae=vae_config,
                            scheduler=scheduler, missing=missing, extra={"converted_from": dict(sources or {})},
                            **defaults)
    return Pipeline(config, params, tokenizer if text_config is not None else None)


def assemble(family: str, unet_config: UNet3DConfig, unet_params: dict, scheduler: SchedulerConfig,
             defaults: Mapping, *, vae_config: Optional[VAEConfig] = None, vae_params: Optional[dict] = None,
             text_config: Optional[TextConfig] = None, text_params: Optional[dict] = None, tokenizer=None,
             sources: Optional[Mapping[str, str]] = None) -> Pipeline:
    """A Pipeline from converted components, after checking that they fit together (absent ones: ``missing``)."""
    where = ", ".join(sources.values()) if sources else family
    problems = []
    if vae_config is not None and vae_config.latent_channels != unet_config.in_channels:
        problems.append(f"the VAE has {vae_config.latent_channels} latent channels but the UNet takes "
                        f"{unet_config.in_channels}")
    if text_config is not None:
        if text_config.width != unet_config.cross_attention_dim:
            problems.append(f"the text encoder's width {text_config.width} is not the UNet's cross-attention "
                            f"dim {unet_config.cross_attention_dim}")
        if tokenizer is None:
            problems.append("a text encoder without a tokenizer")
        elif tokenizer.vocab_size > text_config.vocab_size or tokenizer.context_length > text_config.context_length:
            problems.append(f"the tokenizer ({tokenizer.vocab_size} tokens, {tokenizer.context_length} positions) "
                            f"does not fit the text encoder ({text_config.vocab_size} tokens, "
                            f"{text_config.context_length} positions)")
    return pipeline_of_parts(family, unet_config, unet_params, scheduler, defaults, problems, where, vae_config=vae_config,
                             vae_params=vae_params, text_config=text_config, text_params=text_params,
                             tokenizer=tokenizer, sources=sources)


def _named(name: str, convert: Callable, *args):
    """Run a component converter; its errors name the checkpoint file."""
    try:
        return convert(*args)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None


def _describe(source) -> str:
    return os.path.abspath(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else "<state dict>"


# ---- Wan2.1 -------------------------------------------------------------------------------------------------------
WAN_PIPELINES = ("WanPipeline",)
WAN_RELEASE_VAE = "Wan2.1_VAE.pth"
WAN_RELEASE_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_RELEASE_TOKENIZER = os.path.join("google", "umt5-xxl")
WAN_SCHEDULERS = {"UniPCMultistepScheduler": "unipc-flow", "FlowMatchEulerDiscreteScheduler": "euler-flow"}


def wan_diffusers_pipeline(diffusers: PathLike) -> Pipeline:
    """Wan2.1 T2V in diffusers format: ``transformer/`` (required; config.json + single or sharded safetensors),
    and whichever of ``vae/``, ``text_encoder/`` with ``tokenizer/``, ``scheduler/`` are present (absent ones:
    ``PipelineConfig.missing``; no scheduler: ``SchedulerConfig.wan()``, UniPC with flow shift 3).

    Sampling defaults: :data:`WAN_DEFAULTS` (diffusers' ``WanPipeline``)."""
    folder = diffusers_folder(diffusers, WAN_PIPELINES, "Wan text-to-video")
    sub = lambda name: os.path.join(folder, name)  # noqa: E731
    if not os.path.isdir(sub("transformer")):
        raise CheckpointError(f"{folder}: no transformer/ folder (expected a diffusers Wan pipeline folder)")
    wan_config, wan_params = convert_transformer_folder(sub("transformer"), "diffusers")
    components = {}
    if os.path.isdir(sub("vae")):
        components["vae_config"], components["vae_params"] = load_diffusers_wan_vae(sub("vae"))
    if os.path.isdir(sub("text_encoder")) != os.path.isdir(sub("tokenizer")):
        raise CheckpointError(f"{folder}: text_encoder/ and tokenizer/ go together; only one of them is there")
    if os.path.isdir(sub("text_encoder")):
        components["text_config"], components["text_params"] = load_hf_umt5(sub("text_encoder"))
        components["tokenizer"] = _umt5_tokenizer(sub("tokenizer"), components["text_config"])
    scheduler = _wan_scheduler(os.path.join(folder, "scheduler", "scheduler_config.json"))
    return assemble_wan(wan_config, wan_params, scheduler, sources={"diffusers": os.path.abspath(folder)},
                        **components)


def wan_original_pipeline(original: PathLike, vae_config: Optional[WanVAEConfig] = None,
                          text_config: Optional[UMT5Config] = None) -> Pipeline:
    """Wan2.1 T2V from the original release folder: ``config.json`` + ``diffusion_pytorch_model*.safetensors``
    (required), and whichever of ``Wan2.1_VAE.pth`` and ``models_t5_umt5-xxl-enc-bf16.pth`` with the tokenizer
    folder ``google/umt5-xxl/`` are present. The release states no architecture for those two: ``vae_config`` /
    ``text_config`` default to the released ones (``WanVAEConfig()``, ``UMT5Config.umt5_xxl()``).

    Sampling defaults: :data:`WAN_DEFAULTS` with the original's UniPC flow shift 5
    (``SchedulerConfig.wan(flow_shift=5)``)."""
    folder = os.fspath(original)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such Wan release folder")
    wan_config, wan_params = convert_transformer_folder(folder, "original")
    components = {}
    vae_file, t5_file = os.path.join(folder, WAN_RELEASE_VAE), os.path.join(folder, WAN_RELEASE_T5)
    if os.path.isfile(vae_file):
        vae_config = vae_config or WanVAEConfig()
        components.update(vae_config=vae_config, vae_params=convert_original_wan_vae(vae_file, vae_config))
    if os.path.isfile(t5_file):
        tokenizer_dir = os.path.join(folder, WAN_RELEASE_TOKENIZER)
        if not os.path.isdir(tokenizer_dir):
            raise CheckpointError(f"{folder}: {WAN_RELEASE_T5} is there but not its tokenizer folder "
                                  f"{WAN_RELEASE_TOKENIZER}/")
        text_config = text_config or UMT5Config.umt5_xxl()
        components.update(text_config=text_config, text_params=convert_original_umt5(t5_file, text_config),
                          tokenizer=_umt5_tokenizer(tokenizer_dir, text_config))
    return assemble_wan(wan_config, wan_params, SchedulerConfig.wan(flow_shift=WAN_ORIGINAL_SHIFT),
                        sources={"original": os.path.abspath(folder)}, **components)


def _umt5_tokenizer(folder: str, text_config: UMT5Config) -> UMT5Tokenizer:
    try:
        return UMT5Tokenizer.from_dir(folder, text_len=text_config.text_len)
    except Exception as e:  # the tokenizers library raises plain Exceptions for unreadable files
        raise CheckpointError(f"{folder}: not a usable umT5 tokenizer folder ({_one_line(str(e))})") from None


def _wan_scheduler(path: str) -> SchedulerConfig:
    """``SchedulerConfig`` of a Wan ``scheduler_config.json`` (UniPC with flow sigmas, or flow-matching Euler);
    none: ``SchedulerConfig.wan()``."""
    if not os.path.isfile(path):
        return SchedulerConfig.wan()
    cfg = read_json(path)
    cls = cfg.get("_class_name")
    if cls not in WAN_SCHEDULERS:
        raise CheckpointError(f"{path}: scheduler {cls!r} is not supported for Wan (supported: "
                              f"{', '.join(WAN_SCHEDULERS)})")
    if cls == "UniPCMultistepScheduler":
        if cfg.get("prediction_type") != "flow_prediction" or not cfg.get("use_flow_sigmas", False):
            raise CheckpointError(f"{path}: UniPC must run on flow sigmas with prediction_type 'flow_prediction' "
                                  f"(got use_flow_sigmas={cfg.get('use_flow_sigmas')!r}, "
                                  f"prediction_type={cfg.get('prediction_type')!r})")
        shift = cfg.get("flow_shift", 1.0)
    else:
        if cfg.get("use_dynamic_shifting", False):
            raise CheckpointError(f"{path}: use_dynamic_shifting is not supported")
        shift = cfg.get("shift", 1.0)
    try:
        return SchedulerConfig.wan(WAN_SCHEDULERS[cls], float(shift)).replace(
            num_train_timesteps=cfg.get("num_train_timesteps", 1000))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def assemble_wan(wan_config: WanConfig, wan_params: dict, scheduler: SchedulerConfig, *,
                 vae_config: Optional[WanVAEConfig] = None, vae_params: Optional[dict] = None,
                 text_config: Optional[UMT5Config] = None, text_params: Optional[dict] = None, tokenizer=None,
                 sources: Optional[Mapping[str, str]] = None) -> Pipeline:
    """A Wan Pipeline from converted components, after checking that they fit together (absent ones:
    ``missing``)."""
    where = ", ".join(sources.values()) if sources else "wan"
    problems = []
    if vae_config is not None and not vae_config.z_dim == wan_config.in_channels == wan_config.out_channels:
        problems.append(f"the VAE has {vae_config.z_dim} latent channels but the transformer takes "
                        f"{wan_config.in_channels} and makes {wan_config.out_channels}")
    if text_config is not None:
        if text_config.dim != wan_config.text_dim:
            problems.append(f"the text encoder's width {text_config.dim} is not the transformer's text_dim "
                            f"{wan_config.text_dim}")
        if tokenizer is None:
            problems.append("a text encoder without a tokenizer")
        elif tokenizer.vocab_size > text_config.vocab_size:
            problems.append(f"the tokenizer ({tokenizer.vocab_size} tokens) does not fit the text encoder "
                            f"({text_config.vocab_size} tokens)")
    return pipeline_of_parts("wan", wan_config, wan_params, scheduler, WAN_DEFAULTS, problems, where, vae_config=vae_config,
                             vae_params=vae_params, text_config=text_config, text_params=text_params,
                             tokenizer=tokenizer, sources=sources)

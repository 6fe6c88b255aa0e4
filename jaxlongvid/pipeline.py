"""A text-to-video pipeline: static configuration + weights + tokenizer, saved as one directory.

``Pipeline(config, params, tokenizer)``: ``config`` is a frozen :class:`PipelineConfig` (denoiser, optional VAE,
text encoder and scheduler configs, default sampling settings); ``params`` is ``{"unet": ..., "text": ...,
"vae": ...}`` (plain nested dicts of arrays, ``vae`` absent for pixel-space models; ``"unet"`` names the denoiser
whatever its kind, a UNet or Wan's transformer); ``tokenizer`` turns prompts into int32 ids (and, for umT5, a
mask). Nothing here knows a model family: each sub-config is an instance of a registered config class
(:func:`register_model`), stored in ``pipeline.json`` by class name and built back from it.

Families: the UNets (LaVie, VideoCrafter, ModelScope: ``UNet3DConfig`` + CLIP ``TextConfig`` + ``VAEConfig``)
and Wan2.1 (``WanConfig`` + ``UMT5Config`` + ``WanVAEConfig``, whose VAE codes ``1 + 4k`` video frames as
``1 + k`` latent frames: ``PipelineConfig.temporal_factor`` 4).

On disk (:func:`save` / :func:`load`)::

    DIR/pipeline.json   format tag, version, the configs (``{"class": name, "config": to_dict()}``)
    DIR/params/         orbax checkpoint of ``params`` (host NumPy arrays: no device layout is recorded)
    DIR/tokenizer/      the tokenizer's own files (``tokenizer.save``)

``save`` writes everything into a temporary sibling directory and renames it into place at the end, so an
interrupted save leaves no half-written pipeline behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import json
import numbers
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxlongvid import files
from jaxlongvid.methods import get_method
from jaxlongvid.models.layers import IMPLEMENTATIONS
from jaxlongvid.schedulers import SchedulerConfig

FORMAT = "jaxlongvid-pipeline"
VERSION = 1
CONFIG_FILE = "pipeline.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
OPTIONAL_COMPONENTS = ("vae", "text")  # what a partial conversion may leave out (PipelineConfig.missing)
TINY_DIR = os.path.join(os.path.dirname(__file__), "tiny", "weights")
TINY_DIT_DIR = os.path.join(os.path.dirname(__file__), "tiny_dit", "weights")
# bundled name -> (directory, what the error says when it is not there)
BUNDLED = {
    "tiny": (TINY_DIR, "the bundled tiny model is not in this installation ({dir} has no {file}); train it with "
                       "`python -m jaxlongvid.tiny.train` or pass a pipeline directory"),
    "tiny-dit": (TINY_DIT_DIR, "the bundled tiny DiT is not shipped yet ({dir} has no {file}); train it with "
                               "`python -m jaxlongvid.tiny.train --model dit --export DIR` and pass DIR "
                               "(or copy DIR to {dir})"),
}

# ---- registry of model config classes -------------------------------------------------------------------------
# name -> "module:ConfigClass:ModuleClass". The denoiser module is built as ModuleClass(config, method=..., dtype=...)
# and called (x [B,F,H,W,C], timesteps [B], context [B,L,D], fps=None). Text encoders and VAEs are used through
# functions of the Python module that defines their module class (component_functions): text
# ``encode(params, config, *tokens)`` (tokens as the tokenizer's ``encode`` gives them: ids, or ids and mask) and
# VAE ``decode(params, config, latents, chunk=...)``; every component has ``param_shapes(config)``.
_BUILTIN = {
    "UNet3DConfig": "jaxlongvid.models.unet3d:UNet3DConfig:UNet3D",
    "TextConfig": "jaxlongvid.models.text:TextConfig:TextEncoder",
    "VAEConfig": "jaxlongvid.models.vae:VAEConfig:AutoencoderKL",
    "WanConfig": "jaxlongvid.models.wan:WanConfig:WanTransformer",
    "UMT5Config": "jaxlongvid.models.umt5:UMT5Config:UMT5Encoder",
    "WanVAEConfig": "jaxlongvid.models.wan_vae:WanVAEConfig:Decoder",
}
_REGISTERED: dict[str, tuple[type, type]] = {}


def register_model(config_cls: type, module_cls: type, name: Optional[str] = None) -> None:
    """Make ``config_cls`` storable in ``pipeline.json`` (under ``name``, default its class name) and say which
    Flax module it builds. Config classes need ``to_dict()`` / ``from_dict()`` and must be frozen dataclasses. A text
    encoder's or VAE's module class must be defined in a Python module that also has its functions
    (:func:`component_functions`: ``encode`` or ``decode``, and ``param_shapes``)."""
    name = name or config_cls.__name__
    for attr in ("to_dict", "from_dict"):
        if not hasattr(config_cls, attr):
            raise TypeError(f"{config_cls.__name__} needs a {attr}() method to be stored in {CONFIG_FILE}")
    _REGISTERED[name] = (config_cls, module_cls)


def _lookup(name: str) -> tuple[type, type]:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTIN:
        module_name, config_name, module_cls_name = _BUILTIN[name].split(":")
        module = importlib.import_module(module_name)
        _REGISTERED[name] = (getattr(module, config_name), getattr(module, module_cls_name))
        return _REGISTERED[name]
    known = sorted(set(_BUILTIN) | set(_REGISTERED))
    raise ValueError(f"unknown model config class {name!r}; known: {known} (see jaxlongvid.pipeline.register_model)")


def _class_name(config) -> str:
    for name, (cls, _) in _REGISTERED.items():
        if type(config) is cls:
            return name
    name = type(config).__name__
    if name in _BUILTIN and type(config) is _lookup(name)[0]:
        return name
    raise ValueError(f"{type(config).__name__} is not a registered model config class "
                     f"(see jaxlongvid.pipeline.register_model)")


def module_class(config) -> type:
    """The Flax module class a registered config builds."""
    return _lookup(_class_name(config))[1]


def component_functions(config):
    """The Python module holding a component's functions (a text encoder's or VAE's ``encode`` / ``decode``,
    ``param_shapes``; a denoiser's ``attention_bytes`` / ``activation_bytes`` for ``jaxlongvid.memory``): the one
    defining the Flax module class its config is registered with."""
    return importlib.import_module(module_class(config).__module__)


def context_dim(denoiser_config) -> int:
    """The width of the text context the denoiser cross-attends to (UNets: ``cross_attention_dim``, Wan:
    ``text_dim``)."""
    for name in ("cross_attention_dim", "text_dim"):
        if hasattr(denoiser_config, name):
            return getattr(denoiser_config, name)
    raise ValueError(f"{type(denoiser_config).__name__} names no text width (cross_attention_dim or text_dim)")


def _config_to_json(config) -> Optional[dict]:
    return None if config is None else {"class": _class_name(config), "config": config.to_dict()}


def _config_from_json(entry: Optional[dict]):
    if entry is None:
        return None
    return _lookup(entry["class"])[0].from_dict(entry["config"])


# ---- configuration ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PipelineConfig:
    """Static description of a pipeline (hashable: a ``jax.jit`` static argument).

    ``unet``: the denoiser's config (a registered class, e.g. ``UNet3DConfig``) with ``in_channels`` and
    optionally ``downsample_factor``, ``fps_conditioning``. ``vae``: ``VAEConfig`` or None for a pixel-space
    model whose output is the image in [-1, 1]. ``text``: the text encoder's config. ``missing``: components a
    partial conversion left out (``"vae"``, ``"text"``; their configs are None): such a pipeline runs
    ``pipe.denoiser`` but cannot sample. The sampling settings are what ``jaxlongvid.sample`` uses for arguments
    left out (``num_frames`` counts video frames: :meth:`latent_frames`). ``extra``: free JSON metadata (training
    run, conversion source); it takes no part in equality or hashing.
    """

    family: str
    unet: Any
    text: Any
    scheduler: SchedulerConfig = SchedulerConfig()
    vae: Any = None
    dtype: str = "float32"  # compute dtype of the denoiser (float32 | bfloat16 | float16)
    attention_implementation: str = "auto"  # auto | xla | cudnn | pallas (models.layers.plan_kernels)
    # default sampling settings
    num_frames: int = 16
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    height: int = 320
    width: int = 512
    fps: Optional[int] = None  # for fps-conditioned models (VideoCrafter2: 28 in its t2v script)
    eta: Optional[float] = None  # DDIM eta; None: the scheduler's
    negative_prompt: str = ""
    missing: tuple[str, ...] = ()  # components left out by a partial (denoiser-only) conversion: "vae", "text"
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"PipelineConfig.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.attention_implementation is None:  # pipelines saved before "auto" existed
            object.__setattr__(self, "attention_implementation", "auto")
        if self.attention_implementation not in IMPLEMENTATIONS:
            raise ValueError(f"PipelineConfig.attention_implementation must be one of {IMPLEMENTATIONS}, got "
                             f"{self.attention_implementation!r}")
        for name in ("num_frames", "num_inference_steps", "height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"PipelineConfig.{name} must be an integer >= 1, got {value!r}")
        for name, optional in (("guidance_scale", False), ("fps", True), ("eta", True)):
            value = getattr(self, name)
            if not (optional and value is None) and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise ValueError(f"PipelineConfig.{name} must be a number{' or null' if optional else ''}, "
                                 f"got {value!r}")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"PipelineConfig.negative_prompt must be a string, got {self.negative_prompt!r}")
        object.__setattr__(self, "missing", tuple(self.missing))
        unknown = [m for m in self.missing if m not in OPTIONAL_COMPONENTS]
        present = [m for m in self.missing if m in OPTIONAL_COMPONENTS and getattr(self, m) is not None]
        if unknown or present:
            raise ValueError(f"PipelineConfig.missing lists {unknown + present}: it may only name absent "
                             f"components among {OPTIONAL_COMPONENTS}")
        if self.vae is not None and self.vae.latent_channels != self.unet.in_channels:
            raise ValueError(f"the VAE has {self.vae.latent_channels} latent channels but the denoiser takes "
                             f"{self.unet.in_channels}")
        if self.vae is None and "vae" not in self.missing and self.unet.in_channels != 3:
            raise ValueError(f"a pixel-space pipeline (no VAE) needs a denoiser on 3 channels, got "
                             f"{self.unet.in_channels}")

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame after the first: the VAE's (Wan: 4, ``1 + 4k`` frames make ``1 + k``
        latent frames); 1 in pixel space or when every frame is coded alone."""
        return 1 if self.vae is None else self.vae.temporal_factor

    @property
    def latent_factor(self) -> int:
        """Image pixels per latent pixel (the VAE's downsampling; 1 in pixel space)."""
        return 1 if self.vae is None else self.vae.downsample_factor

    @property
    def spatial_factor(self) -> int:
        """Height and width must be multiples of this (VAE factor x the denoiser's own downsampling)."""
        return self.latent_factor * getattr(self.unet, "downsample_factor", 1)

    @property
    def latent_channels(self) -> int:
        return self.unet.in_channels

    @property
    def uses_fps(self) -> bool:
        return bool(getattr(self.unet, "fps_conditioning", False))

    @property
    def native_frames(self) -> Optional[int]:
        """The denoiser's training length in latent frames (None: not stated)."""
        return getattr(self.unet, "native_frames", None)

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for ``num_frames`` video frames: ``(num_frames - 1) // t + 1`` with ``t`` =
        :attr:`temporal_factor`; a count the VAE cannot make (not ``1 + t k``) is a one-line error."""
        t = self.temporal_factor
        if t == 1:
            return num_frames
        if num_frames < 1 or (num_frames - 1) % t:
            low = max(1, (num_frames - 1) // t * t + 1)
            raise ValueError(f"num_frames={num_frames}: this {self.family} model makes 1 + {t}k frames (its VAE "
                             f"codes the first frame alone, then {t} frames per latent frame); use {low} or "
                             f"{low + t}")
        return (num_frames - 1) // t + 1

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(unet=_config_to_json(self.unet), text=_config_to_json(self.text), vae=_config_to_json(self.vae),
                 scheduler=self.scheduler.to_dict(), missing=list(self.missing), extra=dict(self.extra))
        return {"format": FORMAT, "version": VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "PipelineConfig":
        d = dict(d)
        if d.pop("format", None) != FORMAT:
            raise ValueError("not a jaxlongvid pipeline config (no matching 'format' entry)")
        version = d.pop("version", None)
        if version != VERSION:
            raise ValueError(f"pipeline config version {version} is not supported (this is {VERSION})")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown pipeline config fields {unknown}")
        d.update(unet=_config_from_json(d["unet"]), text=_config_from_json(d["text"]),
                 vae=_config_from_json(d.get("vae")), scheduler=SchedulerConfig.from_dict(d["scheduler"]))
        return cls(**d)

    def replace(self, **changes) -> "PipelineConfig":
        return dataclasses.replace(self, **changes)


# ---- pure functions of (config, params) -----------------------------------------------------------------------
def build_denoiser(config: PipelineConfig, method="direct"):
    """The denoiser Flax module for ``method`` (preset name, Method or MethodPlan). ``attention_implementation``
    is passed only when it is not "auto", every denoiser's default (registered modules need not take it)."""
    extra = {} if config.attention_implementation == "auto" else {
        "attention_implementation": config.attention_implementation}
    return module_class(config.unet)(config.unet, method=get_method(method), dtype=jnp.dtype(config.dtype), **extra)


def cast_params(params, dtype):
    """The weights of every dense / convolution layer (a dict holding a ``kernel``: its kernel and bias) cast to
    the compute ``dtype``; everything else (normalisation scales and biases, position tables) stays as it is.

    Those layers cast their weights to the compute dtype before use anyway, so the outputs are unchanged
    bit for bit; done once before sampling, it halves the weights' memory and the per-step casts go away."""
    dtype = jnp.dtype(dtype)

    def cast(tree):
        if not isinstance(tree, dict):
            return tree
        if "kernel" in tree and not isinstance(tree["kernel"], dict):
            return {k: (v.astype(dtype) if k in ("kernel", "bias") and v.dtype != dtype else v)
                    for k, v in tree.items()}
        return {k: cast(v) for k, v in tree.items()}

    return cast(params)


def apply_denoiser(config: PipelineConfig, method, params, latents, timesteps, context, fps=None):
    """Model output ``[B, F, H, W, C]`` for ``latents`` at ``timesteps`` [B] given the text ``context``."""
    kwargs = {"fps": fps} if (fps is not None and config.uses_fps) else {}
    return build_denoiser(config, method).apply({"params": params}, latents, timesteps, context, **kwargs)


def tokenize(tokenizer, texts) -> tuple[np.ndarray, ...]:
    """The text encoder's inputs for a list of prompts, as a tuple: ``(ids int32 [B, L],)``, or for umT5
    ``(ids, mask bool [B, L])``."""
    tokens = tokenizer.encode(list(texts))
    tokens = tokens if isinstance(tokens, tuple) else (tokens,)
    return (np.asarray(tokens[0], np.int32),) + tuple(np.asarray(t) for t in tokens[1:])


def apply_text_encoder(config: PipelineConfig, params, tokens):
    """Context ``[B, L, D]`` (float32) for the tokenizer's output ``tokens`` (:func:`tokenize`)."""
    return component_functions(config.text).encode(params, config.text, *tokens).astype(jnp.float32)


def decode_latents(config: PipelineConfig, params, latents, chunk: int = 8):
    """Images in about [-1, 1] ``[B, frames, H, W, 3]``: VAE decode (``chunk`` latent frames at a time; Wan's
    VAE makes ``1 + 4 (F - 1)`` frames of ``F``), or the identity in pixel space."""
    if config.vae is None:
        if "vae" in config.missing:
            raise ValueError("this pipeline has no VAE (a denoiser-only conversion): it cannot decode latents; "
                             "convert it again with the VAE")
        return latents.astype(jnp.float32)
    return component_functions(config.vae).decode(params, config.vae, latents, chunk=chunk)


# ---- the pipeline object ------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Pipeline:
    """Configuration, weights and tokenizer of one text-to-video model."""

    config: PipelineConfig
    params: dict = field(repr=False)
    tokenizer: Any = field(default=None, repr=False)
    _placed: dict = field(default_factory=dict, repr=False)  # mesh -> params replicated on that mesh

    def __post_init__(self):
        expected = ["unet"] + [k for k in ("text", "vae") if getattr(self.config, k) is not None]
        missing = [k for k in expected if k not in self.params]
        if missing:
            raise ValueError(f"Pipeline params lack {missing}; expected keys {', '.join(expected)}")

    def denoiser(self, latents, timesteps, context, *, fps=None, method="direct"):
        """The denoiser's output for ``latents [B, F, H, W, C]``, ``timesteps [B]``, ``context [B, L, D]``."""
        return apply_denoiser(self.config, method, self.params["unet"], latents, timesteps, context, fps)

    def encode_prompts(self, prompts) -> jnp.ndarray:
        """Text context ``[B, L, D]`` for a list of prompts."""
        if self.config.text is None:
            raise ValueError("this pipeline has no text encoder")
        if self.tokenizer is None:
            raise ValueError("this pipeline has no tokenizer")
        tokens = tuple(jnp.asarray(t) for t in tokenize(self.tokenizer, prompts))
        return encode_text(self.config, self.params["text"], tokens)

    def decode(self, latents, chunk: int = 8):
        """Frames ``[B, frames, H, W, 3]`` in [-1, 1] from latents ``[B, F, h, w, C]`` as the sampler holds
        them (normalised; Wan: ``frames = 1 + 4 (F - 1)``)."""
        return decode_latents(self.config, self.params.get("vae"), latents, chunk)

    def num_parameters(self) -> dict[str, int]:
        return {k: int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(v)))
                for k, v in self.params.items()}


encode_text = jax.jit(apply_text_encoder, static_argnums=0)  # (config, text params, tokens) -> context


# ---- files --------------------------------------------------------------------------------------------------------
def is_pipeline_dir(path: str) -> bool:
    """Whether ``path`` is a directory holding a jaxlongvid ``pipeline.json`` (the only kind ``save`` replaces)."""
    try:
        with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_target(directory: str, overwrite: bool) -> str:
    """``directory`` as an absolute path that :func:`save` may write, or a one-line error: an existing path is
    replaced only with ``overwrite`` and only if it is a jaxlongvid pipeline (nothing else is ever deleted)."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.islink(directory) and not os.path.exists(directory):
        raise FileExistsError(f"{directory} is a symbolic link to a missing path ({os.readlink(directory)}); "
                              f"nothing is written through it: remove it or choose another --out")
    if os.path.lexists(directory):
        if not overwrite:
            raise FileExistsError(f"{directory} exists; pass --overwrite (overwrite=True) to replace it")
        if os.path.islink(directory) or not is_pipeline_dir(directory):
            kind = "a symbolic link" if os.path.islink(directory) else (
                "a directory that is not a jaxlongvid pipeline" if os.path.isdir(directory) else "a file")
            raise FileExistsError(f"{directory} is {kind} (no {CONFIG_FILE} of a jaxlongvid pipeline); "
                                  f"--overwrite only replaces pipeline directories, so nothing was deleted: "
                                  f"choose another --out")
    return directory


def save(pipe: Pipeline, directory: str, overwrite: bool = False) -> str:
    """Write ``pipe`` to ``directory`` (see the module docstring); returns the absolute path.

    Everything goes to a unique temporary sibling first and is swapped into place at the end
    (:mod:`jaxlongvid.files`: a lock against concurrent writers, recovery of an interrupted swap). An existing
    pipeline is replaced only with ``overwrite=True`` (and only once the new one is complete); anything else at
    ``directory`` is refused. Multi-host: call it on every process with ``directory`` on a shared file system
    (the checkpoint write is collective; process 0 locks, writes the JSON and tokenizer and renames).
    """
    import orbax.checkpoint as ocp

    directory = check_target(directory, overwrite)
    main = jax.process_index() == 0
    if main:
        os.makedirs(os.path.dirname(directory), exist_ok=True)
    with files.directory_lock(directory) if main else contextlib.nullcontext():
        if main:
            files.recover(directory, is_pipeline_dir)
            check_target(directory, overwrite)  # again: recovery may have restored a previous version
        tmp = _shared(files.temp_sibling(directory))
        if main:
            os.makedirs(tmp)
        _sync("jaxlongvid-save-start")
        try:
            host_params = jax.tree_util.tree_map(_to_numpy, pipe.params)
            checkpointer = ocp.StandardCheckpointer()
            checkpointer.save(os.path.join(tmp, PARAMS_DIR), host_params)
            checkpointer.wait_until_finished()
            if main:
                if pipe.tokenizer is not None:
                    pipe.tokenizer.save(os.path.join(tmp, TOKENIZER_DIR))
                with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
                    json.dump(pipe.config.to_dict(), f, indent=1)
                    f.write("\n")  # pipeline.json last: a staging directory without it is never a pipeline
                files.swap_in(tmp, directory, is_pipeline_dir, "a jaxlongvid pipeline")
        except BaseException:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    _sync("jaxlongvid-save-done")
    return directory


def _shared(text: str) -> str:
    """Process 0's ``text`` on every process (the one staging name of a multi-host save)."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    data = np.frombuffer(text.encode().ljust(4096, b"\0"), np.uint8)
    return bytes(multihost_utils.broadcast_one_to_all(data)).rstrip(b"\0").decode()


def _to_numpy(x):
    from jax.experimental import multihost_utils

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def resolve(name_or_dir: str) -> str:
    """A pipeline directory for a path or a bundled name (:data:`BUNDLED`: ``"tiny"``, ``"tiny-dit"``), with a
    clear error if it is missing.

    A directory left missing by an interrupted swap is restored from its previous version first."""
    path = os.fspath(name_or_dir)
    if path in BUNDLED:
        directory, missing = BUNDLED[path]
        if not os.path.isfile(os.path.join(directory, CONFIG_FILE)):
            raise FileNotFoundError(missing.format(dir=directory, file=CONFIG_FILE))
        return directory
    if not os.path.lexists(path) and files.leftovers(os.path.abspath(path), "old"):
        with files.directory_lock(os.path.abspath(path)):
            files.recover(os.path.abspath(path), is_pipeline_dir)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such pipeline directory (or use a bundled name: "
                                f"{', '.join(repr(name) for name in BUNDLED)})")
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        raise FileNotFoundError(f"{path}: not a jaxlongvid pipeline (no {CONFIG_FILE}); convert a checkpoint "
                                f"with `jaxlongvid convert ...` first")
    return path


def load_config(name_or_dir: str) -> PipelineConfig:
    path = os.path.join(resolve(name_or_dir), CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return PipelineConfig.from_dict(json.load(f))
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        problem = f"missing entry {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise ValueError(f"{path}: not a readable jaxlongvid pipeline config ({problem})") from None


@functools.lru_cache(maxsize=16)
def param_shapes(config: PipelineConfig) -> dict:
    """The parameter tree every component's Flax module initialises (``jax.eval_shape``: nothing allocated),
    ``{"unet": ..., "text": ..., "vae": ...}`` for the components the config has.

    Traced once per config (seconds: the whole model's init is traced) and cached; the tree is shared, so
    treat it as read-only."""
    key = jax.random.key(0)
    unet = build_denoiser(config)
    s = getattr(config.unet, "downsample_factor", 1)
    x = jnp.zeros((1, 2, s, s, config.unet.in_channels))
    context = jnp.zeros((1, 1, context_dim(config.unet)))
    fps = {"fps": jnp.zeros((1,), jnp.int32)} if config.uses_fps else {}
    shapes = {"unet": jax.eval_shape(lambda: unet.init(key, x, jnp.zeros((1,), jnp.int32), context, **fps))["params"]}
    for name in ("text", "vae"):
        component = getattr(config, name)
        if component is not None:
            shapes[name] = component_functions(component).param_shapes(component)
    return shapes


def flat_shapes(tree: dict) -> dict[str, tuple[int, ...]]:
    """``{"unet/conv_in/kernel": shape, ...}`` for a nested dict of arrays or shape structs."""
    from flax.traverse_util import flatten_dict

    return {"/".join(k): tuple(np.shape(v)) for k, v in flatten_dict(tree).items()}


def shapes_cache_dir() -> str:
    """Where :func:`expected_shapes` keeps its files: ``$JAXLONGVID_CACHE``, else ``$XDG_CACHE_HOME/jaxlongvid``
    (``~/.cache/jaxlongvid``)."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxlongvid")
    return os.path.join(os.environ.get("JAXLONGVID_CACHE") or default, "param_shapes")


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 of this package's Python source and the jax / flax versions: what the parameter trees of the
    models can depend on besides their configs."""
    import flax

    digest = hashlib.sha256(f"jax {jax.__version__} flax {flax.__version__}".encode())
    root = os.path.dirname(os.path.abspath(__file__))
    for folder, _, names in sorted(os.walk(root)):
        for name in sorted(n for n in names if n.endswith(".py")):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(os.path.relpath(os.path.join(folder, name), root).encode() + b"\0" + f.read())
    return digest.hexdigest()


def expected_shapes(config: PipelineConfig) -> dict[str, tuple[int, ...]]:
    """:func:`flat_shapes` of :func:`param_shapes`, kept in a file per (config, :func:`code_digest`) under
    :func:`shapes_cache_dir`: tracing a model's init takes seconds, reading the file milliseconds, and any change
    of the code or the config is a new file, so a stale tree is never used. Without a writable cache folder
    the tree is traced every time."""
    entries = {k: v for k, v in config.to_dict().items() if k != "extra"}
    key = hashlib.sha256((code_digest() + json.dumps(entries, sort_keys=True)).encode()).hexdigest()
    path = os.path.join(shapes_cache_dir(), f"{key[:32]}.json")
    try:
        with open(path, encoding="utf-8") as f:
            return {k: tuple(v) for k, v in json.load(f).items()}
    except (OSError, ValueError, AttributeError, TypeError):
        pass  # absent or damaged: traced and rewritten below
    shapes = flat_shapes(param_shapes(config))
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with files.atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(shapes, f)
    return shapes


def check_params(params: dict, expected: dict[str, tuple[int, ...]], what: str, max_listed: int = 10) -> None:
    """One error naming the leaves of ``params`` that are missing, unexpected, mis-shaped or not finite
    against the ``expected`` shapes (:func:`expected_shapes`: ``{"unet/conv_in/kernel": shape, ...}``)."""
    from flax.traverse_util import flatten_dict

    got = {"/".join(k): v for k, v in flatten_dict(params).items()}
    found = [("missing", sorted(set(expected) - set(got))), ("unexpected", sorted(set(got) - set(expected))),
             ("mis-shaped", sorted(f"{k} {tuple(np.shape(got[k]))} (model: {expected[k]})"
                                   for k in set(expected) & set(got) if tuple(np.shape(got[k])) != expected[k])),
             ("non-finite", nonfinite_leaves(got))]
    problems = [f"{len(items)} {label}: " + ", ".join(items[:max_listed]) + (", ..." if len(items) > max_listed else "")
                for label, items in found if items]
    if problems:
        raise ValueError(f"{what}: the weights do not fit the model: " + "; ".join(problems))


def nonfinite_leaves(flat: dict) -> list[str]:
    """Names of the leaves of a flat ``{name: array}`` holding NaN or Inf, with their count (floats only)."""
    bad = []
    for name, value in flat.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16":
            count = int(value.size - np.count_nonzero(np.isfinite(value.astype(np.float32))))
            if count:
                bad.append(f"{name} ({count} of {value.size} values)")
    return sorted(bad)


class ClosedLoopFilter:
    """A ``sys.unraisablehook`` that drops the ``RuntimeError('Event loop is closed')`` reports of reads still in
    flight when orbax gave up on a damaged checkpoint (tensorstore completes them on its own threads after the
    restore's event loop closed; the error :func:`load` raised already says what is wrong) and passes every
    other report to the hook it replaced. :func:`load` installs it for the restore and leaves it in place only
    when the restore failed."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, report):
        if not (isinstance(report.exc_value, RuntimeError) and str(report.exc_value) == "Event loop is closed"):
            self.previous(report)


def load(name_or_dir: str) -> Pipeline:
    """Read a pipeline written by :func:`save` (or a bundled name, ``"tiny"`` / ``"tiny-dit"``). Parameters land on
    the default device.

    The restored weights are checked against the model's own parameter tree (:func:`expected_shapes`: every leaf
    present, nothing extra, every shape) and must be finite; any problem is one error naming the leaves."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(resolve(name_or_dir))
    config = load_config(path)
    params_dir = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise FileNotFoundError(f"{path}: the pipeline has no {PARAMS_DIR}/ checkpoint")
    hook = sys.unraisablehook
    sys.unraisablehook = ClosedLoopFilter(hook)  # from the start: reads may be abandoned before `except` runs
    try:
        params = ocp.StandardCheckpointer().restore(params_dir)
    except Exception as e:  # orbax raises many kinds for damaged data; the user needs the path and the cause
        first = (str(e).splitlines() or [""])[0][:300]
        raise ValueError(f"{params_dir}: the weights cannot be read, the checkpoint is damaged or incomplete "
                         f"({type(e).__name__}: {first}); convert or save the pipeline again") from None
    sys.unraisablehook = hook  # read completely: nothing is left in flight
    check_params(params, expected_shapes(config), path)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    tokenizer = None
    if os.path.isdir(os.path.join(path, TOKENIZER_DIR)):
        from jaxlongvid.models.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(os.path.join(path, TOKENIZER_DIR))
    return Pipeline(config, params, tokenizer)

"""Text-to-video sampling: ``jaxlongvid.sample(pipe, prompt, num_frames=..., method=...)``.

The steps, each a jitted pure function of (static config, arrays):

1. prompts -> token ids (host) -> text context for the pair (negative prompt, prompt);
2. initial noise from ``jax.random.key(seed)``: FreeNoise rescheduling when the method's ``noise`` is
   ``"freenoise"``, else Gaussian;
3. the whole denoising loop under one ``jax.jit`` (``lax.scan`` over the schedule's rows; step by step under
   a progress bar, see below): classifier-free guidance batches the uncond/cond pair into one model call,
   ``uncond + g * (cond - uncond)``, then one scheduler step (:mod:`jaxlongvid.schedulers`);
4. decoding (VAE, chunked over frames, or the identity for pixel-space models) and conversion to uint8 as
   LaVie does it: ``floor(clip((x / 2 + 0.5) * 255 + 0.5, 0, 255))``.

Sharding: with a mesh (``mesh=`` or ``devices=``), every step runs under ``jax.set_mesh(mesh)``. Latents are
split over the ``frames`` axis, the guidance pair over ``data``; the model's own constraints keep activations
frame-sharded and ``TemporalAttention`` reshards to pixels around attention; the Wan DiT keeps its tokens split
by whole latent frames and runs self-attention context-parallel (``sharding.sequence_parallel``). A (latent)
frame count that does not split evenly is an error before anything is traced. Inputs become global arrays through
``jax.make_array_from_callback`` and the result comes back with ``process_allgather``, so the same call works
on several hosts after ``jax.distributed.initialize()`` (every process calls ``sample`` with the same
arguments; the progress bar shows on process 0).

Precision (``precision=``): every program ``sample`` compiles (text encoder, denoising loop, decoder) is traced
under ``jax.default_matmul_precision(precision)``, so its matrix products and convolutions carry that precision in
the compiled HLO, and JAX's jit caches (keyed on that setting) never reuse a program traced at another one. By
default a float32 pipeline runs at ``"highest"`` (true float32; JAX's own default lets NVIDIA GPUs multiply
float32 in TF32, about 2x faster on the tiny model, with partition-dependent rounding). A bfloat16 / float16
pipeline keeps JAX's setting. Measured sharded-vs-unsharded agreement on GPUs: ``docs/benchmarks.md``.

Progress bar (``progress=True``): a Python loop over ``denoise_step``, one jitted program per step, blocking
after each step so the bar counts finished steps; ``progress=False`` runs ``denoise``, the whole loop as one
``lax.scan`` program (identical results on the test models). The alternative, a ``jax.debug.callback`` inside
the scan, was timed against it on CPU (2 shared cores, the stand-in denoiser of ``tests/test_sampling.py``, one
guided prompt, 24 frames at 16x16, 20-50 steps, medians of 15-40 interleaved runs after compilation, 7
comparisons). Over the bar-less scan the callback added 8-15 % (e.g. 20 steps 142 -> 154 ms, 50 steps
340 -> 370 ms) and the per-step loop -1 to +10 % (155 ms, 358 ms): faster in 4 comparisons, at most 2 % slower
in the other 3, i.e. a tie within noise. The per-step loop is kept: no slower, a truthful bar, and no host
callback inside sharded programs.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxlongvid import schedulers, sharding
from jaxlongvid.positions import _check_int as _int
from jaxlongvid.methods import AUTO, Method, MethodPlan, TimePlan, as_plan, get_method
from jaxlongvid.pipeline import (Pipeline, PipelineConfig, apply_denoiser, cast_params, decode_latents,
                                 encode_text, tokenize)

LATENTS = P(None, sharding.FRAMES)  # [B, F, h, w, C]: frames split, batch whole
PAIR = sharding.VIDEO  # the guidance pair [2B, F, h, w, C]: batch over "data" too


# ---- request checking (all before anything is traced) ---------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """A checked sampling request (every default filled in)."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    single: bool  # a single prompt string: return [F, H, W, 3]
    num_frames: int  # video frames
    latent_frames: int  # frames the denoiser runs on (PipelineConfig.latent_frames; = num_frames for the UNets)
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    fps: Optional[int]
    eta: Optional[float]
    seed: int
    method: Union[Method, MethodPlan, TimePlan]
    precision: Optional[str] = None  # resolved: "default" | "high" | "highest", or None for JAX's own setting

    @property
    def guided(self) -> bool:
        """Classifier-free guidance is on for scales above 1 (as LaVie / diffusers decide)."""
        return self.guidance_scale > 1.0

    @property
    def model_batch(self) -> int:
        return len(self.prompts) * (2 if self.guided else 1)


def _seed(seed) -> int:
    seed = _int("seed", seed, 0)
    if seed >= 2 ** 32:
        raise ValueError(f"seed must be < 2**32, got {seed}")
    return seed


PRECISIONS = ("default", "high", "highest")


def resolve_precision(precision, config: PipelineConfig) -> Optional[str]:
    """The matmul precision the sampler's programs are traced at: ``precision`` itself, or for None
    ``"highest"`` on a float32 pipeline (float32 means float32, on every device and partitioning) and JAX's own
    setting (None) on a bfloat16 / float16 one."""
    if precision is None:
        return "highest" if config.dtype == "float32" else None
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be None, 'default', 'high' or 'highest', got {precision!r}")
    return precision


def precision_context(precision: Optional[str]):
    """``jax.default_matmul_precision(precision)``, or no change for None."""
    return jax.default_matmul_precision(precision) if precision is not None else contextlib.nullcontext()


def _prompts(prompt) -> tuple[tuple[str, ...], bool]:
    if isinstance(prompt, str):
        return (prompt,), True
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError("prompt is an empty list; give a string or a non-empty list of strings")
        bad = [type(p).__name__ for p in prompt if not isinstance(p, str)]
        if bad:
            raise TypeError(f"every prompt must be a string, got {bad}")
        return tuple(prompt), False
    raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")


def check_request(pipe: Pipeline, prompt, *, num_frames=None, method="direct", seed=0, num_inference_steps=None,
                  guidance_scale=None, height=None, width=None, negative_prompt=None, fps=None,
                  eta=None, precision=None) -> Request:
    """Fill in the pipeline's defaults and check every argument; raises a clear error naming the problem."""
    config = pipe.config
    if config.missing:
        raise ValueError(f"this pipeline has no {' and no '.join(config.missing)} (a denoiser-only conversion): "
                         f"it runs pipe.denoiser but cannot sample; convert it again with those components")
    d = config  # its sampling settings are the defaults
    prompts, single = _prompts(prompt)
    negative_prompt = d.negative_prompt if negative_prompt is None else negative_prompt
    negatives = (negative_prompt,) * len(prompts) if isinstance(negative_prompt, str) else _prompts(negative_prompt)[0]
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    num_frames = _int("num_frames", d.num_frames if num_frames is None else num_frames, 1)
    latent_frames = config.latent_frames(num_frames)
    steps = _int("num_inference_steps", d.num_inference_steps if num_inference_steps is None
                 else num_inference_steps, 1)
    height = _int("height", d.height if height is None else height, 1)
    width = _int("width", d.width if width is None else width, 1)
    factor = config.spatial_factor
    if height % factor or width % factor:
        raise ValueError(f"height and width ({height}, {width}) must be multiples of {factor} for this model "
                         f"(VAE x{config.latent_factor}, denoiser x{factor // config.latent_factor})")
    scale = d.guidance_scale if guidance_scale is None else guidance_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)) \
            or not math.isfinite(scale):
        raise ValueError(f"guidance_scale must be a finite number, got {scale!r}")
    if fps is not None:
        fps = _int("fps", fps, 1)
        if not config.uses_fps:
            raise ValueError(f"fps={fps} was given but this {config.family} model has no fps conditioning")
    fps = (d.fps if fps is None else fps) if config.uses_fps else None
    if eta is not None:
        if config.scheduler.kind != "ddim":
            raise ValueError(f"eta applies to DDIM; this pipeline samples with {config.scheduler.kind}")
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
    eta = d.eta if eta is None else eta
    if pipe.tokenizer is None:
        raise ValueError("this pipeline has no tokenizer, so it cannot encode prompts")
    method = auto_method(config, latent_frames) if isinstance(method, str) and method == AUTO else get_method(method)
    request = Request(prompts=prompts, negative_prompts=negatives, single=single, num_frames=num_frames,
                      latent_frames=latent_frames,
                      num_inference_steps=steps, guidance_scale=float(scale), height=height, width=width, fps=fps,
                      eta=None if eta is None else float(eta), seed=_seed(seed),
                      method=method, precision=resolve_precision(precision, config))
    schedulers.timesteps(config.scheduler, steps)  # checks the step count against the schedule
    return request


# ---- method="auto" and methods scheduled over denoising time -------------------------------------------------
# The recommended method past the native length (docs/motion.md): see AUTO_TABLE.
AUTO_LONG = "longdiff"
AUTO_TABLE = {"native length or shorter": "direct", "past the native length": AUTO_LONG}


def auto_method(config: PipelineConfig, num_frames: int):
    """``method="auto"``: the project's recommended method for the model and length (:data:`AUTO_TABLE`):
    ``direct`` up to the denoiser's native frame count (or when the model states none), else
    :data:`AUTO_LONG`. ``num_frames`` counts latent frames, as ``native_frames`` does."""
    native = config.native_frames
    return get_method("direct" if native is None or num_frames <= native else AUTO_LONG)


def resolve_phases(method, steps: int) -> tuple[tuple[int, int, Union[Method, MethodPlan]], ...]:
    """``(start, stop, method)`` step ranges of a method over ``steps`` denoising steps, decided once before
    tracing: one phase for a Method or MethodPlan; for a :class:`TimePlan` phase k ends at
    ``round(end_k * steps)``, and phases left with no step are dropped."""
    method = get_method(method)
    if not isinstance(method, TimePlan):
        return ((0, steps, method),)
    phases, start = [], 0
    for end, phase_method in method.phases:
        stop = int(round(end * steps))
        if stop > start:
            phases.append((start, stop, phase_method))
            start = stop
    return tuple(phases)


def resolve_mesh(mesh, devices, guided: bool, mesh_axes=(sharding.FRAMES, sharding.DATA)):
    if mesh is not None and devices is not None:
        raise ValueError("give mesh= or devices=, not both")
    if devices is not None:
        return sharding.mesh_for_devices(devices, guided)
    return sharding.normalise_mesh(mesh, mesh_axes)


# ---- the pure pieces ------------------------------------------------------------------------------------------
def initial_noise(key, shape, method) -> jnp.ndarray:
    """Starting latents ``[B, F, h, w, C]``: FreeNoise rescheduling along frames if the method asks, else Gaussian."""
    method = get_method(method)
    first = method.phases[0][1] if isinstance(method, TimePlan) else method
    return as_plan(first).noise.sample(key, shape, axis=1)


def _keys(seed):
    noise_key, loop_key = jax.random.split(jax.random.key(seed))
    return noise_key, loop_key


def guided_output(config: PipelineConfig, method, params, x, timestep, context, fps, guidance_scale, guided: bool):
    """The model output for latents ``x [B, ...]`` with the uncond/cond pair batched as ``[2B, ...]``."""
    pair = jnp.concatenate([x, x]) if guided else x
    pair = sharding.constrain(pair, PAIR if guided else LATENTS)
    ts = jnp.full((pair.shape[0],), timestep, timestep.dtype)  # int32 (DDPM-family rows) or float32 (flow)
    out = apply_denoiser(config, method, params, pair, ts, context, fps)
    if guided:
        uncond, cond = jnp.split(out.astype(jnp.float32), 2)
        out = uncond + guidance_scale * (cond - uncond)
    return sharding.constrain(out, LATENTS)


def _step(config: PipelineConfig, method, guided: bool, stochastic: bool, params, carry, row, i, context, fps,
          guidance_scale, loop_key):
    """One denoising step: model output (with guidance), then the scheduler update of ``carry``
    (:func:`schedulers.init_carry`; its first entry is the sample)."""
    x = carry[0]
    out = guided_output(config, method, params, x, row.timestep, context, fps, guidance_scale, guided)
    z = None
    if stochastic:
        z = sharding.constrain(jax.random.normal(jax.random.fold_in(loop_key, i), x.shape), LATENTS)
    carry = schedulers.advance(config.scheduler, row, carry, out, z)
    return tuple(sharding.constrain(c, LATENTS) for c in carry)


_STATIC = ("config", "method", "guided", "stochastic")


@functools.partial(jax.jit, static_argnames=_STATIC)
def denoise(params, latents, context, fps, rows, guidance_scale, seed, *, config: PipelineConfig, method,
            guided: bool, stochastic: bool):
    """The whole denoising loop as one program: ``lax.scan`` over the schedule ``rows`` (a
    :class:`schedulers.Schedule` or :class:`schedulers.FlowSchedule` of arrays). ``context`` is ``[2B, L, D]``
    (negatives first) when ``guided``, else ``[B, L, D]``; ``latents`` the initial noise ``[B, F, h, w, C]``."""
    _, loop_key = _keys(seed)

    def body(carry, xs):
        row, i = xs
        return _step(config, method, guided, stochastic, params, carry, row, i, context, fps, guidance_scale,
                     loop_key), None

    carry, _ = jax.lax.scan(body, _start(latents, rows), (rows, jnp.arange(len(rows.timestep))))
    return carry[0]


@functools.partial(jax.jit, static_argnames=_STATIC)
def denoise_phase(params, carry, context, fps, rows, steps, guidance_scale, seed, *, config: PipelineConfig,
                  method, guided: bool, stochastic: bool):
    """One phase of a :class:`TimePlan`'s loop: ``lax.scan`` over its schedule ``rows`` (the global step
    indices ``steps``) from the scheduler's ``carry``, with the phase's static method; returns the carry."""
    _, loop_key = _keys(seed)

    def body(carry, xs):
        row, i = xs
        return _step(config, method, guided, stochastic, params, carry, row, i, context, fps, guidance_scale,
                     loop_key), None

    carry, _ = jax.lax.scan(body, carry, (rows, steps))
    return carry


@functools.partial(jax.jit, static_argnames=_STATIC)
def denoise_step(params, carry, context, fps, rows, i, guidance_scale, seed, *, config: PipelineConfig, method,
                 guided: bool, stochastic: bool):
    """Step ``i`` of the same loop as its own program, for a progress bar driven from Python."""
    _, loop_key = _keys(seed)
    row = jax.tree_util.tree_map(lambda a: a[i], rows)
    return _step(config, method, guided, stochastic, params, carry, row, i, context, fps, guidance_scale, loop_key)


def run_loop(params, latents, context, fps, rows, guidance_scale, seed, *, config, method, guided, stochastic,
             progress: bool):
    """``denoise`` in one program (a :class:`TimePlan`: one ``denoise_phase`` program per phase of
    :func:`resolve_phases`), or with ``progress`` step by step under a tqdm bar (see the module notes)."""
    steps = len(rows.timestep)
    phases = resolve_phases(method, steps)
    static = dict(config=config, guided=guided, stochastic=stochastic)
    if not progress and len(phases) == 1:
        return denoise(params, latents, context, fps, rows, guidance_scale, seed, method=phases[0][2], **static)
    carry = _start(latents, rows)
    if not progress:
        for start, stop, phase_method in phases:
            part = jax.tree_util.tree_map(lambda a: a[start:stop], rows)
            carry = denoise_phase(params, carry, context, fps, part, jnp.arange(start, stop), guidance_scale, seed,
                                  method=phase_method, **static)
        return carry[0]
    from tqdm.auto import tqdm

    # every process runs the same programs; only process 0 draws the bar
    with tqdm(total=steps, desc="denoising", unit="step", disable=jax.process_index() != 0) as bar:
        for start, stop, phase_method in phases:
            for i in range(start, stop):
                carry = denoise_step(params, carry, context, fps, rows, i, guidance_scale, seed,
                                     method=phase_method, **static)
                carry[0].block_until_ready()  # so the bar shows finished steps
                bar.update(1)
    return carry[0]


@jax.jit
def _start(latents, rows):
    """The loop's first carry (:func:`schedulers.init_carry`) as global arrays laid out like ``latents``."""
    latents = sharding.constrain(latents.astype(jnp.float32), LATENTS)
    return tuple(sharding.constrain(c, LATENTS) for c in schedulers.init_carry(rows, latents))


def to_uint8(images) -> jnp.ndarray:
    """[-1, 1] -> uint8 with LaVie's rounding (``+ 0.5`` then truncation, clipped to [0, 255])."""
    return jnp.floor(jnp.clip((images / 2.0 + 0.5) * 255.0 + 0.5, 0.0, 255.0)).astype(jnp.uint8)


@functools.lru_cache(maxsize=32)
def _decoder(config: PipelineConfig, mesh, spec, chunk: int, as_uint8: bool):
    """The jitted decode. Under a mesh a VAE that codes each frame alone decodes every device's own frames
    (``shard_map``); a causal one over time (Wan's, ``temporal_factor > 1``: each chunk depends on the frames
    before it) decodes the gathered latents."""
    causal = config.temporal_factor > 1

    def fn(vae_params, latents):
        if causal:  # every latent frame on every device (nothing to do without a mesh)
            latents = sharding.constrain(latents, P())
        images = decode_latents(config, vae_params, latents, chunk)
        return to_uint8(images) if as_uint8 else images

    if mesh is not None and config.vae is not None and not causal:
        fn = jax.shard_map(fn, mesh=mesh, in_specs=(P(), spec), out_specs=spec)
    return jax.jit(fn)


# ---- the public entry ---------------------------------------------------------------------------------------------
def sample(pipe: Pipeline, prompt: Union[str, Sequence[str]], num_frames: Optional[int] = None,
           method: Union[str, Method, MethodPlan, TimePlan] = "direct", seed: int = 0,
           num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
           height: Optional[int] = None, width: Optional[int] = None,
           negative_prompt: Union[str, Sequence[str], None] = None, fps: Optional[int] = None,
           eta: Optional[float] = None, mesh=None, devices=None, progress: bool = True, output: str = "uint8",
           decode_chunk: int = 8, precision: Optional[str] = None,
           mesh_axes: Sequence[str] = (sharding.FRAMES, sharding.DATA)) -> np.ndarray:
    """Generate a video (or a batch of videos) from text.

    Args:
      pipe: a :class:`~jaxlongvid.pipeline.Pipeline` (``jaxlongvid.load(...)``).
      prompt: a string, or a list of strings for a batch.
      num_frames, num_inference_steps, guidance_scale, height, width, negative_prompt, fps, eta: default to
        the pipeline config's settings. ``fps`` only for fps-conditioned models; ``eta`` only for DDIM.
        ``num_frames`` counts video frames: Wan makes ``1 + 4k`` (81: 21 latent frames), other counts are an
        error.
      method: preset name (``direct``, ``freenoise``, ``freelong``, ``longdiff``, ``freeloc``, ...,
        ``keepmotion``), ``"auto"`` (:func:`auto_method`: the recommended one for the model and length), a
        Method, a MethodPlan or a TimePlan (methods scheduled over the denoising steps).
      seed: everything random (initial noise, stochastic sampler noise) derives from ``jax.random.key(seed)``.
      mesh: any ``jax.sharding.Mesh`` (e.g. ``jax.make_mesh((8,), ("frames",))``, explicit or auto axes) with a
        ``frames`` axis and optionally ``data`` (other names: ``mesh_axes``; see
        :func:`jaxlongvid.sharding.normalise_mesh`); or ``devices``: a count or a list of devices to build one
        (``data=2`` for the guidance pair when the count is even).
      mesh_axes: the names of ``mesh``'s frame axis and (optional) guidance-pair axis.
      progress: show a progress bar over the denoising steps.
      output: ``"uint8"`` (default), ``"float"`` (the decoded frames in about [-1, 1], float32, unclipped) or
        ``"latents"`` (the denoised latents ``[..., latent frames, h, w, C]``, before decoding).
      decode_chunk: frames the VAE decodes at a time (per device).
      precision: matmul / convolution precision of the compiled programs: ``"default"``, ``"high"`` or
        ``"highest"`` (``jax.default_matmul_precision``). None: ``"highest"`` for a float32 pipeline (no TF32 on
        NVIDIA GPUs), JAX's setting for a bfloat16 / float16 one.
    Returns:
      NumPy ``[frames, H, W, 3]`` for a string prompt, ``[B, frames, H, W, 3]`` for a list.
    """
    if output not in ("uint8", "float", "latents"):
        raise ValueError(f"output must be 'uint8', 'float' or 'latents', got {output!r}")
    request = check_request(pipe, prompt, num_frames=num_frames, method=method, seed=seed,
                            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                            width=width, negative_prompt=negative_prompt, fps=fps, eta=eta, precision=precision)
    mesh = resolve_mesh(mesh, devices, request.guided, mesh_axes)
    sharding.check_mesh(mesh, request.latent_frames, request.model_batch, request.num_frames)
    config = pipe.config
    schedule = schedulers.make_schedule(config.scheduler, request.num_inference_steps, request.eta)
    with precision_context(request.precision):  # traced (and cached) at this precision
        latents = _generate(pipe, request, schedule, mesh, progress)
        video = latents if output == "latents" else _decode(pipe, latents, mesh, decode_chunk, output == "uint8")
    video = sharding.to_host(video)
    return video[0] if request.single else video


def _mesh_context(mesh):
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def _placed_params(pipe: Pipeline, mesh):
    """The pipeline's weights as sampling uses them: the denoiser's dense / conv weights cast once to the compute
    dtype (``cast_params``), replicated over ``mesh`` when given (cached per mesh and params object)."""
    cached = pipe._placed.get(mesh)
    if cached is None or cached[0] is not pipe.params:  # new mesh, or the params were replaced
        pipe._placed.clear()
        params = dict(pipe.params, unet=cast_params(pipe.params["unet"], pipe.config.dtype))
        if mesh is not None:
            params = sharding.put_tree(params, sharding.named(mesh, P()))
        cached = pipe._placed[mesh] = (pipe.params, params)
    return cached[1]


def _generate(pipe: Pipeline, request: Request, schedule, mesh, progress: bool):
    """Latents after the denoising loop, ``[B, F, h, w, C]`` (sharded over frames under a mesh)."""
    config = pipe.config
    replicated = sharding.named(mesh, P())
    f = config.latent_factor
    shape = (len(request.prompts), request.latent_frames, request.height // f, request.width // f,
             config.latent_channels)
    texts = (request.negative_prompts + request.prompts) if request.guided else request.prompts
    tokens = tuple(sharding.put(t, replicated) for t in tokenize(pipe.tokenizer, texts))
    fps = None
    if config.uses_fps and request.fps is not None:
        fps = sharding.put(np.full((len(texts),), request.fps, np.int32), replicated)
    rows = type(schedule)(*(sharding.put(np.asarray(x), replicated) for x in schedule))
    seed = sharding.put(np.uint32(request.seed), replicated)
    scale = sharding.put(np.float32(request.guidance_scale), replicated)
    with _mesh_context(mesh):
        params = _placed_params(pipe, mesh)
        context = encode_text(config, params["text"], tokens)
        latents = _noise(shape, request.method, mesh)(seed)
        return run_loop(params["unet"], latents, context, fps, rows, scale, seed, config=config,
                        method=request.method, guided=request.guided, stochastic=schedule.stochastic,
                        progress=progress)


@functools.lru_cache(maxsize=32)
def _noise(shape, method, mesh):
    def fn(seed):
        noise_key, _ = _keys(seed)
        return initial_noise(noise_key, shape, method)

    return jax.jit(fn, out_shardings=sharding.named(mesh, LATENTS))


def _decode(pipe: Pipeline, latents, mesh, chunk: int, as_uint8: bool):
    """Frames from latents; under a mesh the VAE decodes over every device when the frames split that far."""
    spec = LATENTS
    if mesh is not None and latents.shape[1] % mesh.devices.size == 0:
        spec = P(None, (sharding.FRAMES, sharding.DATA))
    with _mesh_context(mesh):
        params = _placed_params(pipe, mesh).get("vae")
        return _decoder(pipe.config, mesh, spec, chunk, as_uint8)(params, latents)

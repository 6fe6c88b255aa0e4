"""FreeLOC's layer-adaptive probing: per-layer sensitivity scores, and the per-layer method plan they imply.

Two scores per temporal attention layer (METHODS.md section 2), both measured with the model run as it is
(``direct``) on its own inputs:

* **context sensitivity**: how much the layer's attention entropy grows when the video is longer. The
  statistic is the entropy (nats) of each query frame's attention weights, averaged over pixels, heads, query
  frames, the batch and the probed steps; the score is ``H(long) - H(native)``. Raw entropy is the default:
  attention that spreads evenly over 4x the frames gains up to ``log 4``, which is the dilution that hurts long
  videos (LongDiff's Theorem 2: the entropy's lower bound grows with ``log N``), whereas a layer that keeps
  attending to a few frames gains nothing. ``normalize=True`` divides each query's entropy by the log of its
  number of visible keys instead, which removes that ``log N`` growth and scores only a change of *shape*.
* **position sensitivity**: ``||L_shift - L_ori||_F / ||L_ori||_F`` for the attention logits ``L`` (scaled
  ``q.k`` plus every position term) at the native length, where ``L_shift`` moves every relative distance
  ``d != 0`` out of the trained range to ``d + sign(d) * N0``. Norms are taken over the batch, pixels, heads and
  all probed steps together. Only the position encoding changes, so a model without temporal position
  encoding scores exactly 0.

The statistics come from the temporal attention layers themselves (:class:`jaxlongvid.attention.TemporalAttention`
in the UNets, the self-attention ``attn1`` of each Wan DiT block), which sow them
(:func:`jaxlongvid.attention.probe_statistics`) into the ``intermediates`` collection when (and only when) that
collection is mutable; no flag is threaded through the blocks. On a DiT the attention is over tokens: each query
token's entropy is over all key tokens, averaged over the tokens of its frame, and the logits are the full 3D-RoPE
logits with only the frame distance shifted. Layer names are the parameter paths of the denoiser module's
``temporal_layer_names(config)``, read from the Python module that defines the denoiser (every model family
provides one), so nothing here knows a family.

Inputs: :func:`probe` runs a short sampler trajectory (``num_steps`` steps of the pipeline's own scheduler,
classifier-free guidance as the pipeline samples) once at the native length and once at the long length, and
records the statistics at every step, so each layer sees the noisy inputs the model itself produces on the way.
The native run starts from the first N0 frames of the long run's noise. Guided runs record both halves of the
guidance pair (unconditional and conditional inputs).

Routing (:func:`plan_from_scores`): context-sensitive layers get TSA + VRPR (the ``freeloc`` preset),
layers sensitive only to positions get VRPR alone, the rest the default (``direct``). A layer is sensitive when
its score is above the threshold, which defaults to the median of that score over the layers: about half the
layers get TSA, as in FreeLOC's shipped Wan2.1 routing (17 of 30 layers), and with all position scores 0 (no
position encoding) no layer is routed to VRPR alone.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
from typing import NamedTuple, Optional, Sequence, Union

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from jaxlongvid import schedulers
from jaxlongvid.attention.core import ENTROPY, LOGITS_SQ, SHIFT_CHANGE_SQ  # the sown statistics' names
from jaxlongvid.methods import Method, MethodPlan, as_plan, get_method


class ProbeInput(NamedTuple):
    """One denoiser call: ``x [B, F, H, W, C]``, ``timesteps [B]``, ``context [B, L, D]``, ``fps [B]`` or None."""

    x: jnp.ndarray
    timesteps: jnp.ndarray
    context: jnp.ndarray
    fps: Optional[jnp.ndarray] = None


# ---- one denoiser call with the statistics sown -----------------------------------------------------------------
def _layer_names(model) -> tuple[str, ...]:
    """The denoiser's temporal layer paths: ``temporal_layer_names(config)`` of the module defining its class."""
    family = importlib.import_module(type(model).__module__)
    if not hasattr(family, "temporal_layer_names"):
        raise ValueError(f"{type(model).__name__} ({family.__name__}) names no temporal layers "
                         f"(a temporal_layer_names(config) function beside the module): cannot probe it")
    return tuple(family.temporal_layer_names(model.config))


def _layer_method(model, name: str) -> Method:
    """The Method that the model's temporal layer ``name`` runs."""
    return as_plan(getattr(model, "method", "direct")).resolve(_layer_names(model)).for_layer(name)


@functools.partial(jax.jit, static_argnums=0)
def _apply_collecting(model, params, x, timesteps, context, fps):
    kwargs = {} if fps is None else {"fps": fps}
    out, state = model.apply({"params": params}, x, timesteps, context, mutable=["intermediates"], **kwargs)
    return out, state.get("intermediates", {})


def layer_statistics(model, params, inputs: ProbeInput) -> tuple[jnp.ndarray, dict[str, dict[str, np.ndarray]]]:
    """The denoiser's output for ``inputs`` and, per temporal layer (forward order), what it sowed:
    ``attention_entropy [B, heads, N]`` and, at N <= N0, ``logits_sq`` and ``shift_change_sq`` ``[B, heads]``.

    ``model`` is the denoiser module (e.g. ``UNet3D(config)``; probing uses its ``method``, normally
    ``direct``), ``params`` its weights.
    """
    names = _layer_names(model)
    merged = [n for n in names
              if _layer_method(model, n).merge is not None]
    if merged:
        raise ValueError(f"temporal layers {merged} merge windows or spectra, which have no single attention "
                         "distribution to probe (use method='direct')")
    out, sown = _apply_collecting(model, params, *inputs)
    per_layer: dict[str, dict[str, np.ndarray]] = {}
    for path, values in flax.traverse_util.flatten_dict(jax.device_get(sown), sep="/").items():
        layer, _, stat = path.rpartition("/")
        per_layer.setdefault(layer, {})[stat] = np.concatenate([np.asarray(v) for v in values], axis=0)
    unknown = sorted(set(per_layer) - set(names))
    if unknown:
        raise ValueError(f"statistics were sown by modules that are not temporal layers of this model: {unknown}")
    missing = [n for n in names if ENTROPY not in per_layer.get(n, {})]
    if missing:
        raise ValueError(f"temporal layers {missing} recorded no attention entropy")
    return out, {n: per_layer[n] for n in names}


# ---- scores from statistics -----------------------------------------------------------------------------------------
def _mean_entropy(model, stats: Sequence[dict], normalize: bool) -> dict[str, float]:
    """Per layer: entropy averaged over the calls, batch, heads and query frames (optionally normalised)."""
    names = _layer_names(model)
    result = {}
    for i, name in enumerate(names):
        values = []
        for s in stats:
            h = s[name][ENTROPY]  # [B, heads, N]
            if normalize:
                h = h / _log_visible_keys(model, name, h.shape[-1])
            values.append(h.reshape(-1))
        result[name] = float(np.mean(np.concatenate(values)))
    return result


def _log_visible_keys(model, name: str, n: int) -> np.ndarray:
    """``log`` of the number of keys each query frame sees under the layer's method (inf where only one, so
    that the normalised entropy of a single visible key is 0)."""
    method = _layer_method(model, name)
    if method.needs_keyframes:
        raise ValueError(f"normalize=True needs a static mask, but layer {name!r} uses IFS keyframes")
    mask = None if method.mask is None else method.mask.static(n, np)
    visible = np.full(n, n) if mask is None else np.asarray(mask).sum(axis=-1)
    return np.where(visible > 1, np.log(np.maximum(visible, 1)), np.inf)


def _context_scores(model, native_stats, long_stats, normalize: bool) -> dict[str, float]:
    if not native_stats or not long_stats:
        raise ValueError("context sensitivity needs at least one native-length and one long input")
    native = _mean_entropy(model, native_stats, normalize)
    long = _mean_entropy(model, long_stats, normalize)
    return {name: long[name] - native[name] for name in native}


def _position_scores(model, stats) -> dict[str, float]:
    if not stats:
        raise ValueError("position sensitivity needs at least one input")
    result = {}
    for name in _layer_names(model):
        if any(LOGITS_SQ not in s[name] for s in stats):
            frames = stats[0][name][ENTROPY].shape[-1]
            raise ValueError(f"position sensitivity is measured at the native length (N <= N0); layer {name!r} "
                             f"saw {frames} frames")
        change = sum(float(np.sum(s[name][SHIFT_CHANGE_SQ], dtype=np.float64)) for s in stats)
        base = sum(float(np.sum(s[name][LOGITS_SQ], dtype=np.float64)) for s in stats)
        result[name] = math.sqrt(change / base) if base > 0 else (0.0 if change == 0 else math.inf)
    return result


def context_sensitivity(model, params, native_inputs: Sequence[ProbeInput], long_inputs: Sequence[ProbeInput], *,
                        normalize: bool = False) -> dict[str, float]:
    """Per layer: mean attention entropy on ``long_inputs`` minus that on ``native_inputs`` (see the module
    notes; ``normalize`` divides each query's entropy by the log of its visible keys)."""
    stats = lambda inputs: [layer_statistics(model, params, inp)[1] for inp in inputs]
    return _context_scores(model, stats(native_inputs), stats(long_inputs), normalize)


def position_sensitivity(model, params, inputs: Sequence[ProbeInput]) -> dict[str, float]:
    """Per layer: ``||L_shift - L_ori||_F / ||L_ori||_F`` over ``inputs`` (at most N0 frames each)."""
    return _position_scores(model, [layer_statistics(model, params, inp)[1] for inp in inputs])


# ---- probing a pipeline on its own sampler trajectory ---------------------------------------------------------------
def _trajectory_statistics(pipe, model, noise, context, fps, num_steps: int, guidance_scale: float, key):
    """Statistics at every step of a ``num_steps`` run of the pipeline's scheduler from ``noise``."""
    config = pipe.config
    schedule = schedulers.make_schedule(config.scheduler, num_steps, config.eta)
    guided = guidance_scale > 1.0
    params = pipe.params["unet"]
    carry, stats = schedulers.init_carry(schedule, noise), []
    for i in range(num_steps):
        row = schedulers.row_at(schedule, i)
        x = carry[0]
        pair = jnp.concatenate([x, x]) if guided else x
        ts = jnp.full((pair.shape[0],), row.timestep, row.timestep.dtype)  # int (DDPM family) or float (flow)
        out, s = layer_statistics(model, params, ProbeInput(pair, ts, context, fps))
        stats.append(s)
        if guided:
            uncond, cond = jnp.split(out.astype(jnp.float32), 2)
            out = uncond + guidance_scale * (cond - uncond)
        z = jax.random.normal(jax.random.fold_in(key, i), x.shape) if schedule.stochastic else None
        carry = schedulers.advance(config.scheduler, row, carry, out, z)
    return stats


def probe(pipe, prompts: Union[str, Sequence[str]], *, long_frames: Optional[int] = None, num_steps: int = 4,
          seed: int = 0, guidance_scale: Optional[float] = None, height: Optional[int] = None,
          width: Optional[int] = None, fps: Optional[int] = None, normalize: bool = False) -> dict:
    """Per-layer sensitivity scores of a pipeline's denoiser.

    Args:
      pipe: a :class:`~jaxlongvid.pipeline.Pipeline`.
      prompts: one prompt or a list (one video each).
      long_frames: the long length in the denoiser's frames (latent frames for Wan; default ``4 * N0``); the
        native length is the model's N0.
      num_steps: length of the sampler trajectory whose inputs are probed (every step is recorded).
      seed: the noise (``jax.random.key(seed)``).
      guidance_scale, height, width, fps: default to the pipeline's sampling settings.
      normalize: context sensitivity on entropies normalised by log(visible keys) (module notes).
    Returns:
      ``{"context": {layer: score}, "position": {layer: score}}``, layers in forward order.
    """
    from jaxlongvid.pipeline import build_denoiser

    config = pipe.config
    native = config.native_frames
    if native is None:
        raise ValueError(f"the {config.family} denoiser config has no native_frames: cannot probe it")
    long_frames = 4 * native if long_frames is None else long_frames
    if isinstance(long_frames, bool) or not isinstance(long_frames, (int, np.integer)) or long_frames < native:
        raise ValueError(f"long_frames must be an int >= the native length {native}, got {long_frames!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a string or a non-empty list of strings")
    height = config.height if height is None else height
    width = config.width if width is None else width
    factor = config.spatial_factor
    if height < 1 or width < 1 or height % factor or width % factor:
        raise ValueError(f"height and width ({height}, {width}) must be positive multiples of {factor}")
    scale = config.guidance_scale if guidance_scale is None else float(guidance_scale)
    guided = scale > 1.0
    texts = ([config.negative_prompt] * len(prompts) + prompts) if guided else prompts
    context = pipe.encode_prompts(texts)
    fps_value = (fps or config.fps) if config.uses_fps else None
    fps_array = None if fps_value is None else jnp.full((len(texts),), fps_value, jnp.int32)

    f = config.latent_factor
    noise_key, loop_key = jax.random.split(jax.random.key(seed))
    noise = jax.random.normal(noise_key, (len(prompts), long_frames, height // f, width // f,
                                          config.latent_channels), jnp.float32)
    model = build_denoiser(config, "direct")
    run = lambda x: _trajectory_statistics(pipe, model, x, context, fps_array, num_steps, scale, loop_key)
    native_stats = run(noise[:, :native])
    long_stats = native_stats if long_frames == native else run(noise)
    return {"context": _context_scores(model, native_stats, long_stats, normalize),
            "position": _position_scores(model, native_stats)}


# ---- routing ------------------------------------------------------------------------------------------------------
def plan_from_scores(scores: dict, context_threshold: Optional[float] = None,
                     position_threshold: Optional[float] = None, *,
                     tsa_method: Union[str, Method] = "freeloc", vrpr_method: Union[str, Method, None] = None,
                     default: Union[str, Method] = "direct") -> MethodPlan:
    """FreeLOC's routing: layers with context score > ``context_threshold`` get ``tsa_method`` (TSA + VRPR);
    of the rest, those with position score > ``position_threshold`` get ``vrpr_method`` (default: VRPR with
    ``tsa_method``'s VRPR settings and no mask); all others ``default``. Thresholds default to the median of
    each score over the layers. ``scores`` is :func:`probe`'s result."""
    context, position = _checked_scores(scores)
    tsa = _one_method(tsa_method, "tsa_method")
    vrpr = Method("vrpr", positions=tsa.positions) if vrpr_method is None \
        else _one_method(vrpr_method, "vrpr_method")
    default = _one_method(default, "default")
    c_thr = float(np.median(list(context.values()))) if context_threshold is None else float(context_threshold)
    p_thr = float(np.median(list(position.values()))) if position_threshold is None else float(position_threshold)
    layers = []
    for name in context:
        if context[name] > c_thr:
            layers.append((name, tsa))
        elif position[name] > p_thr:
            layers.append((name, vrpr))
    return MethodPlan(default=default, layers=tuple(layers))


def _checked_scores(scores) -> tuple[dict, dict]:
    if not isinstance(scores, dict) or set(scores) != {"context", "position"}:
        raise ValueError("scores must be a dict with exactly the keys 'context' and 'position' (probe's result)")
    context, position = scores["context"], scores["position"]
    if not context:
        raise ValueError("scores name no layers")
    if set(context) != set(position):
        raise ValueError(f"context and position scores name different layers: only context "
                         f"{sorted(set(context) - set(position))}, "
                         f"only position {sorted(set(position) - set(context))}")
    bad = [n for n in context if not math.isfinite(context[n]) or math.isnan(position[n])]
    if bad:
        raise ValueError(f"scores of layers {bad} are not numbers (context must be finite, position not NaN)")
    return context, position


def _one_method(value, what: str) -> Method:
    method = get_method(value)
    if not isinstance(method, Method):
        raise TypeError(f"{what} must be one Method or a preset name, got a {type(method).__name__}")
    return method


# ---- command line (``jaxlongvid probe``; wired in jaxlongvid.cli) ---------------------------------------------------
def add_arguments(parser) -> None:
    """Options of ``jaxlongvid probe`` on an ``argparse`` (sub)parser."""
    parser.add_argument("--model", default="tiny", help="a pipeline directory, or 'tiny' for the bundled model")
    parser.add_argument("--prompt", action="append", required=True, help="a probe prompt (repeat for more)")
    parser.add_argument("--long-frames", type=int, help="long length in the denoiser's frames (latent frames for "
                        "Wan; default: 4x its native frames)")
    parser.add_argument("--steps", type=int, default=4, help="probed sampler steps (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    parser.add_argument("--height", type=int, help="frame height in pixels (default: the model's)")
    parser.add_argument("--width", type=int, help="frame width in pixels (default: the model's)")
    parser.add_argument("--normalize", action="store_true",
                        help="context score on entropy / log(visible keys) instead of raw entropy")
    parser.add_argument("--context-threshold", type=float, help="TSA above this (default: the median)")
    parser.add_argument("--position-threshold", type=float, help="VRPR above this (default: the median)")
    parser.add_argument("--out", help="write the scores and the routing to this JSON file")


def run_from_args(args) -> int:
    """Probe, print one line per layer (score, score, route) and optionally write JSON; returns 0."""
    from jaxlongvid.pipeline import load

    pipe = load(args.model)
    scores = probe(pipe, args.prompt, long_frames=args.long_frames, num_steps=args.steps, seed=args.seed,
                   guidance_scale=args.guidance, height=args.height, width=args.width, normalize=args.normalize)
    plan = plan_from_scores(scores, args.context_threshold, args.position_threshold)
    routes = {name: plan.for_layer(name).name for name in scores["context"]}
    print(f"{'layer':<60} {'context':>9} {'position':>9}  route")
    for name, route in routes.items():
        print(f"{name:<60} {scores['context'][name]:9.4f} {scores['position'][name]:9.4f}  {route}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "prompts": args.prompt, "scores": scores, "routes": routes}, f, indent=1)
            f.write("\n")
    return 0

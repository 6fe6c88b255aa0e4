"""``temporal_attention``: attention over frames under a long-video method, and the single-layer analysis
functions. The method reaches the kernel in three steps: its positions part builds the maps in the program
(with their static facts), :func:`~jaxlongvid.attention.plan.make_plan` decides once how to compute, and
:func:`attend` runs that plan."""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxlongvid import masks
from jaxlongvid.attention import merges
from jaxlongvid.attention.average import probabilities
from jaxlongvid.attention.encoding import Encoding, check_tables, logits as map_logits
from jaxlongvid.attention.kernels.fused import attend_fused, attend_fused_frames
from jaxlongvid.attention.kernels.plane import pallas_forward
from jaxlongvid.attention.kernels.sparse import sparse_forward
from jaxlongvid.attention.kernels.splash import splash_forward
from jaxlongvid.attention.maps import MapInfo, info_of_array, info_of_positions, token_maps
from jaxlongvid.attention.plan import (AttentionPlan, fused_implementation, make_plan, map_average_of,
                                      rope_formulation, token_kernel)
from jaxlongvid.attention.reference import attend_jnp_chunked
from jaxlongvid.methods import FreeLongBlend, FreeNoiseWindows, Method, MethodPlan, get_method


def temporal_attention(q, k, v, *, encoding: Encoding = Encoding(), method="direct", t5_table=None, rel_k=None,
                       rel_v=None, keyframes=None, mask=None, spatial_shape: Optional[tuple[int, int]] = None,
                       implementation: Optional[str] = None, chunk_bytes: Optional[int] = None,
                       mapped_rope: str = "auto", map_average: str = "auto", tokens_per_frame: int = 1):
    """Attention over frames of ``q, k, v: [..., N, heads, dim]`` under a long-video method.

    Args:
      encoding: the model's position encoding (static).
      method: preset name or :class:`~jaxlongvid.methods.Method` (a plan must be resolved to one layer's
        Method first, see ``MethodPlan.for_layer``).
      t5_table: ``[buckets, heads]`` T5 bias table, when ``encoding.t5_buckets``.
      rel_k, rel_v: ``[2R+1, dim]`` relative key/value tables, when ``encoding.rel_distance``.
      keyframes: int ``[..., n]`` IFS keyframes, broadcastable over the leading dims (methods with IFS).
      mask: optional extra bool mask ``[..., N, N]`` (AND-ed with the method's).
      spatial_shape: ``(h, w)`` for FreeLong: the last leading dim must then be the flattened ``h * w`` (or, at
        token level, ``h * w`` = tokens_per_frame).
      implementation: None for the jnp path; ``"cudnn"`` (or ``"xla"``) for fused attention where the RoPE is
        an absolute rotation; ``"pallas"`` for the plane kernel where it is mapped (frames) or the block-sparse
        kernel (tokens; splash attention on TPUs, ``plan.token_kernel``); ``"auto"``: per backend
        (``plan.make_plan``, ``plan.token_kernel``).
      chunk_bytes: memory bound for the mapped-RoPE intermediate of the jnp path; None: 1 GiB on accelerators,
        16 MiB on a CPU.
      mapped_rope: how RoPE is computed under maps that are not a multiple of ``j - i``: "planes",
        "per_value", "per_frequency" (all exact, see ``encoding``), or "auto" (the smallest intermediate).
      map_average: how the softmaxes of several maps are averaged: "slots", "per_map", or "auto" (see
        ``average``). Both exact.
      tokens_per_frame: T > 1 for token-level attention (video DiTs): the N = F T tokens are laid out frame by
        frame, the method's maps, mask and keyframes are over the F frames and apply to every token of a frame
        (``maps.token_maps``); ``mask`` is then token-level. With a fused ``implementation`` a method that maps
        or masks runs one fused call per query frame (``kernels.fused.attend_fused_frames``); ``"pallas"`` runs
        the block-sparse kernel (``kernels.sparse``), which visits only the key frames each query frame keeps.
        Merges act over frames: FreeNoise windows of frames are blocks of tokens, FreeLong blends over (frames,
        h, w) with ``spatial_shape = (h, w)``, ``h w = T``.
    Returns:
      ``[..., N, heads, dim]`` in v's dtype.
    """
    method = one_method(method)
    if q.ndim < 3 or q.shape != k.shape or q.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"q, k, v must be [..., N, heads, dim] with equal shapes (v may differ in dim), got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    n, heads, dim = q.shape[-3:]
    if isinstance(tokens_per_frame, bool) or not isinstance(tokens_per_frame, int) or tokens_per_frame < 1 \
            or n % tokens_per_frame:
        raise ValueError(f"tokens_per_frame must be an int >= 1 that divides the {n} tokens, got {tokens_per_frame!r}")
    frames = n // tokens_per_frame
    seen = min(frames, method.merge.window) if isinstance(method.merge, FreeNoiseWindows) else frames
    encoding = method.positions.encoding_at(encoding, seen, encoding.native_frames)
    check_tables(encoding, heads, dim, t5_table, rel_k, rel_v)
    if rel_v is not None and v.shape[-1] != dim:
        raise ValueError(f"rel_v needs v's dim ({v.shape[-1]}) to equal q's ({dim})")
    t = tokens_per_frame
    options = dict(implementation=implementation, chunk_bytes=chunk_bytes, mapped_rope=mapped_rope,
                   map_average=map_average)

    def run(q_, k_, v_, maps, info, frame_mask, token_mask=None, visible=None, host_mask=None):
        """One attention under frame ``maps`` / ``info`` and a frame mask (and, at token level, an extra token
        mask); tokens take the kernel ``plan.token_kernel`` picks (key frames gathered up to ``visible`` per query
        frame, None: all; ``host_mask``: the frame mask as NumPy where it is known before run time)."""
        if t == 1:
            return attend(q_, k_, v_, maps, info, frame_mask, encoding, t5_table, rel_k, rel_v, **options)
        visible = q_.shape[-3] // t if visible is None else visible
        kernel = token_kernel(info, encoding, frame_mask is not None, frame_mask is None or host_mask is not None,
                              token_mask is not None, implementation)
        if kernel == "frames":
            fused = fused_implementation(implementation, jnp.dtype(q_.dtype).name, q_.shape[-1])
            return attend_fused_frames(q_, k_, v_, maps, info, frame_mask, encoding, t, fused, visible)
        if kernel == "sparse":
            return attend_sparse(q_, k_, v_, maps, info, frame_mask, encoding, t, visible)
        if kernel == "splash":
            return splash_forward(q_, k_, v_, host_mask, info.coefficients[0], encoding, t,
                                  interpret=jax.default_backend() == "cpu")
        full = combine_masks(None if frame_mask is None else token_maps(frame_mask, t), token_mask)
        return attend(q_, k_, v_, token_maps(maps, t), info.for_tokens(t), full, encoding, t5_table, rel_k, rel_v,
                      **options)

    if isinstance(method.merge, FreeNoiseWindows):
        if keyframes is not None or mask is not None:
            raise ValueError("method with a FreeNoise merge takes no keyframes or extra mask")
        return merges.freenoise(q, k, v, method, encoding.native_frames, run, t)
    frame_mask = method_mask(method, frames, keyframes, mask if t == 1 else None)
    maps, info = method_maps(method, frames, encoding.native_frames)
    token_mask = mask if t > 1 else None
    visible = frames if method.mask is None else method.mask.most_visible(frames, encoding.native_frames)
    host_mask = host_frame_mask(method, frames) if t > 1 else None
    out = run(q, k, v, maps, info, frame_mask, token_mask, visible, host_mask)
    if isinstance(method.merge, FreeLongBlend):
        local = combine_masks(masks.local_window(frames, method.merge.local_window, jnp), frame_mask)
        local_visible = min(visible, 2 * method.merge.local_window + 1)
        host_local = None
        if t > 1:  # FreeLong takes no IFS: its frame mask is static
            host_local = masks.local_window(frames, method.merge.local_window, np)
            host_local = host_local if host_mask is None else host_local & host_mask
        exact, exact_info = method_maps(Method(), frames, encoding.native_frames)  # inside the trained window
        out = merges.freelong(out, run(q, k, v, exact, exact_info, local, token_mask, local_visible, host_local),
                              method.merge, spatial_shape, t)
    return out


def one_method(method) -> Method:
    method = get_method(method)
    if isinstance(method, MethodPlan):
        raise TypeError("temporal_attention takes one layer's Method; resolve a MethodPlan with MethodPlan.for_layer")
    return method


def method_maps(method: Method, n: int, native_frames: int):
    """The method's position maps ``[M, N, N]`` built in the program, and their static facts."""
    return method.positions.maps(n, native_frames), info_of_positions(method.positions, n, native_frames)


def combine_masks(a, b):
    if a is None or b is None:
        return b if a is None else jnp.asarray(a)
    return jnp.asarray(a) & jnp.asarray(b)


def method_mask(method: Method, n: int, keyframes, mask):
    """The method's full mask (static part, IFS part, caller's part), built in the program; None: all keys (a
    static part that keeps every key is left out, so such a method runs exactly as one without a mask)."""
    hides = method.mask is not None and not method.mask.hides_nothing(n)
    full = combine_masks(method.mask.static(n) if hides else None, mask)
    if method.needs_keyframes:
        if keyframes is None:
            raise ValueError(f"method {method.name!r} uses IFS and needs keyframes [..., n]")
        return combine_masks(method.mask.with_keyframes(n, keyframes), full)
    if keyframes is not None:
        raise ValueError(f"keyframes were given but method {method.name!r} does not use IFS")
    return full


def host_frame_mask(method: Method, n: int):
    """The method's frame mask as NumPy ``[N, N]`` where it is known before run time and hides a key (no IFS),
    else None (the splash kernel takes it as its block mask)."""
    if method.mask is None or method.needs_keyframes or method.mask.hides_nothing(n):
        return None
    return np.asarray(method.mask.static(n, np))


def attend(q, k, v, maps, info: MapInfo, mask, encoding: Encoding, t5_table, rel_k, rel_v, **options):
    """Attention of every leading index under ``maps`` (jnp [M, N, N]) and ``mask`` ([..., N, N] bool or None):
    plans once, then runs the plan."""
    n, heads, dim = q.shape[-3:]
    plan = make_plan(info, encoding, math.prod(q.shape[:-3]), heads, dim, jnp.dtype(q.dtype).name,
                     (rel_k is not None, rel_v is not None), **options)
    if plan.kernel == "pallas":
        backward = make_plan(info, encoding, math.prod(q.shape[:-3]), heads, dim, jnp.dtype(q.dtype).name,
                             (False, False), None, options.get("chunk_bytes"), "planes", plan.average)
        return attend_pallas(q, k, v, maps, info, mask, encoding, t5_table, plan, backward)
    if plan.kernel == "fused":
        return attend_fused(q, k, v, maps, info, mask, encoding, t5_table, rel_k, plan.implementation)
    return attend_jnp_chunked(q, k, v, maps, info, mask, encoding, t5_table, rel_k, rel_v, plan.rope, plan.average,
                              plan.chunk)


def attend_pallas(q, k, v, maps, info: MapInfo, mask, encoding: Encoding, t5_table, plan: AttentionPlan,
                  backward: AttentionPlan):
    """The plane kernel's forward pass (interpreted on a CPU) with the jnp plane path's gradient (``backward``,
    recomputed in the backward pass)."""
    interpret = jax.default_backend() == "cpu"

    @jax.custom_vjp
    def run(q, k, v, t5, mask, maps):
        return pallas_forward(q, k, v, t5, mask, maps, info, encoding, interpret, plan.average, plan.implementation)

    def forward(q, k, v, t5, mask, maps):
        return run(q, k, v, t5, mask, maps), (q, k, v, t5, mask, maps)

    def grads(saved, grad):
        *arrays, mask, maps = saved
        reference = lambda q, k, v, t5: attend_jnp_chunked(q, k, v, maps, info, mask, encoding, t5, None, None,
                                                           backward.rope, backward.average, backward.chunk)
        return (*jax.vjp(reference, *arrays)[1](grad), None, None)

    run.defvjp(forward, grads)
    return run(q, k, v, t5_table, None if mask is None else jnp.asarray(mask), maps)


def attend_sparse(q, k, v, maps, info: MapInfo, frame_mask, encoding: Encoding, tokens_per_frame: int, visible: int):
    """The block-sparse kernel's forward pass (interpreted on a CPU) with the gradient of the per-query-frame
    fused path (``attend_fused_frames`` through XLA, recomputed in the backward pass: it never forms
    [tokens x tokens] either)."""
    interpret = jax.default_backend() == "cpu"
    t = tokens_per_frame

    @jax.custom_vjp
    def run(q, k, v, mask, maps):
        return sparse_forward(q, k, v, maps, info, mask, encoding, t, visible, interpret)

    def forward(q, k, v, mask, maps):
        return run(q, k, v, mask, maps), (q, k, v, mask, maps)

    def grads(saved, grad):
        *arrays, mask, maps = saved
        fused = lambda q, k, v: attend_fused_frames(q, k, v, maps, info, mask, encoding, t, "xla", visible)
        return (*jax.vjp(fused, *arrays)[1](grad), None, None)

    run.defvjp(forward, grads)
    return run(q, k, v, None if frame_mask is None else jnp.asarray(frame_mask), maps)


# ---- single-layer analysis ---------------------------------------------------------------------------------------
def one_layer(what: str, q, encoding, method, t5_table, rel_k, keyframes, mask, tokens_per_frame: int = 1):
    """Checks shared by the single-layer analysis functions; returns the method, the encoding at this length,
    the full mask, maps and facts (at token level, ``tokens_per_frame`` T > 1: the frame maps and mask expanded
    to blocks of T tokens, ``mask`` then token-level)."""
    method = get_method(method)
    if not isinstance(method, Method) or method.merge is not None:
        raise ValueError(f"{what} needs one layer's Method without a merge")
    check_tables(encoding, q.shape[-2], q.shape[-1], t5_table, rel_k, rel_k)
    t = tokens_per_frame
    if q.shape[-3] % t:
        raise ValueError(f"{what}: tokens_per_frame={t} does not divide the {q.shape[-3]} tokens")
    n = q.shape[-3] // t
    encoding = method.positions.encoding_at(encoding, n, encoding.native_frames)
    maps, info = method_maps(method, n, encoding.native_frames)
    if t == 1:
        return method, encoding, method_mask(method, n, keyframes, mask), maps, info
    frame_mask = method_mask(method, n, keyframes, None)
    full = combine_masks(None if frame_mask is None else token_maps(frame_mask, t), mask)
    return method, encoding, full, token_maps(maps, t), info.for_tokens(t)


def attention_probabilities(q, k, *, encoding: Encoding = Encoding(), method="direct", t5_table=None,
                            rel_k=None, keyframes=None, mask=None, tokens_per_frame: int = 1):
    """The attention weights ``[..., heads, N, N]`` (float32) that ``temporal_attention`` applies to v, for
    methods without a window/spectral merge (``tokens_per_frame`` as there). Used by tests (masked keys are
    exactly 0) and layer probing."""
    _, encoding, full_mask, maps, info = one_layer("attention_probabilities", q, encoding, method, t5_table,
                                                   rel_k, keyframes, mask, tokens_per_frame)
    rope = rope_formulation(info, encoding)
    return probabilities(q, k, maps, info, full_mask, encoding, t5_table, rel_k, rope,
                         map_average_of(info, "auto", rope))[0]


def attention_logsumexp(q, k, *, encoding: Encoding = Encoding(), method="direct", t5_table=None, rel_k=None,
                        keyframes=None, mask=None, tokens_per_frame: int = 1):
    """``logsumexp_j`` of the masked logits, ``[..., heads, N]`` float32 (-inf where a row sees no key), for a
    single-map method. With :func:`merge_passes` it combines attention computed over disjoint key sets."""
    method, encoding, full_mask, maps, info = one_layer("attention_logsumexp", q, encoding, method, t5_table,
                                                        rel_k, keyframes, mask, tokens_per_frame)
    if info.num_maps != 1:
        raise ValueError(f"method {method.name!r} averages {info.num_maps} maps: its passes cannot be merged by "
                         "log-sum-exp")
    logits = map_logits(q, k, maps, info, encoding, t5_table, rel_k, rope_formulation(info, encoding))[0]
    if full_mask is not None:
        logits = jnp.where(full_mask[..., None, :, :], logits, -jnp.inf)
    return jax.nn.logsumexp(logits, axis=-1)


def explicit_logits(q, k, maps: np.ndarray, encoding: Encoding, t5_table, rel_k, tokens_per_frame: int = 1) -> list:
    """Logits under explicit (small, NumPy) frame maps ``[M, F, F]`` (the probe's shifted positions); at token
    level (``tokens_per_frame`` T > 1) each map covers blocks of T tokens."""
    info = info_of_array(maps)
    rope = rope_formulation(info, encoding)
    maps = jnp.asarray(maps)
    if tokens_per_frame > 1:
        maps, info = token_maps(maps, tokens_per_frame), info.for_tokens(tokens_per_frame)
    return map_logits(q, k, maps, info, encoding, t5_table, rel_k, rope)


ENTROPY = "attention_entropy"  # probe statistics (probe_statistics; read by jaxlongvid.probing)
LOGITS_SQ = "logits_sq"
SHIFT_CHANGE_SQ = "shift_change_sq"


def probe_statistics(q, k, *, encoding: Encoding, method: Method, t5_table=None, rel_k=None, keyframes=None,
                     tokens_per_frame: int = 1) -> dict:
    """What FreeLOC's layer probing reads from one attention call on ``q, k [B, ..., N, heads, dim]`` (N = F T
    tokens frame by frame; T = 1 for frame attention), as ``{name: array}``:

    * ``attention_entropy`` ``[B, heads, F]``: entropy (nats) of each query's attention weights under
      ``method``, averaged over the query frame's tokens and the leading dims after the batch (pixels); only for
      methods without a merge;
    * at F <= N0 only, ``logits_sq`` and ``shift_change_sq`` ``[B, heads]``: the squared Frobenius norm of the
      logits under the model's own positions (no mask), and of their change when every relative frame distance
      d becomes d + sign(d) * N0 (all beyond the trained +-(N0 - 1)).
    """
    t = tokens_per_frame
    frames = q.shape[-3] // t
    rest = tuple(range(1, q.ndim - 3))  # leading dims after the batch
    stats = {}
    if method.merge is None:
        p = attention_probabilities(q, k, encoding=encoding, method=method, t5_table=t5_table, rel_k=rel_k,
                                    keyframes=keyframes, tokens_per_frame=t)  # [B, ..., heads, N, N]
        plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
        entropy = -jnp.sum(plogp, axis=-1)  # [B, ..., heads, N]
        entropy = jnp.mean(entropy.reshape(entropy.shape[:-1] + (frames, t)), axis=-1)
        stats[ENTROPY] = jnp.mean(entropy, axis=rest)
    if frames <= encoding.native_frames:
        d = np.arange(frames)[None, :] - np.arange(frames)[:, None]
        ori = explicit_logits(q, k, d[None], encoding, t5_table, rel_k, t)[0]
        change = explicit_logits(q, k, (d + np.sign(d) * encoding.native_frames)[None], encoding, t5_table, rel_k,
                                 t)[0] - ori
        norm_axes = rest + (q.ndim - 2, q.ndim - 1)  # logits: [B, ..., heads, N, N]
        stats[LOGITS_SQ] = jnp.sum(jnp.square(ori), axis=norm_axes)
        stats[SHIFT_CHANGE_SQ] = jnp.sum(jnp.square(change), axis=norm_axes)
    return stats


def merge_passes(outputs, lses):
    """Merge attention passes over DISJOINT key sets into the attention over their union (FreeLOC-style).

    ``outputs``: ``[P, ..., N, heads, dim]``, each pass's softmax-weighted values; ``lses``: ``[P, ..., heads,
    N]`` from :func:`attention_logsumexp`. Pass p's weight for a query is ``exp(lse_p - logsumexp_p lse_p)``;
    a pass whose row saw no key (lse = -inf) contributes nothing, even if its output is NaN.
    """
    lses = jnp.asarray(lses, jnp.float32)
    total = jax.nn.logsumexp(lses, axis=0)
    weights = jnp.where(jnp.isneginf(lses), 0.0, jnp.exp(lses - total))  # [P, ..., H, N]
    weights = jnp.swapaxes(weights, -1, -2)[..., None]  # [P, ..., N, H, 1]
    outputs = jnp.asarray(outputs, jnp.float32)
    return jnp.sum(jnp.where(weights > 0, weights * outputs, 0.0), axis=0)

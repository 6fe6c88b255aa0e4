"""The attention plan: every choice of how to compute one attention call, made once and passed down.

:func:`make_plan` takes the maps' static facts (``MapInfo``), the encoding, the call's shapes, the backend and
the caller's options, and returns an :class:`AttentionPlan`: the RoPE formulation, the map average, the kernel
and the chunking of the jnp path. Nothing below it decides again. It is a pure function of hashable values,
cached by value.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxlongvid.attention.encoding import Encoding
from jaxlongvid.attention.maps import MapInfo, info_of_array

MAPPED_ROPE = ("auto", "planes", "per_value", "per_frequency")
MAP_AVERAGES = ("auto", "slots", "per_map")
IMPLEMENTATIONS = (None, "auto", "xla", "cudnn", "pallas")
# Chunk bounds of the mapped-RoPE intermediate. On a CPU a chunk that stays in the last-level cache runs 2-4x
# faster than one of 1 GiB (measured, docs/benchmarks.md); an accelerator wants large batches.
ACCELERATOR_CHUNK_BYTES = 1 << 30
CPU_CHUNK_BYTES = 16 << 20
# "auto" takes the plane kernel up to this many frames: the range it was measured to win in (128 and 256 frames
# on an H200, docs/benchmarks.md). Past it the kernel loops over blocks of keys (kernels.plane.KEY_BLOCK) with its
# slot table as rows over the frame distance; until that is measured on a GPU, longer videos take the chunked jnp
# path, which LongDiff ran at 3.44x direct's LaVie step at 512 frames (H200).
PALLAS_AUTO_MAX_FRAMES = 256
# Token-level attention (video DiTs): whether "auto" on GPUs takes the block-sparse Pallas kernel
# (``kernels.sparse``). Off until a GPU benchmark shows it ahead of today's choice (``benchmarks/wan_methods.py
# --attention pallas`` against ``--attention cudnn``); "pallas" takes it regardless.
SPARSE_AUTO_ON_GPU = False
TOKEN_KERNELS = ("tokens", "frames", "sparse", "splash")


@dataclass(frozen=True)
class AttentionPlan:
    """How one attention call runs (module doc)."""

    rope: str  # none | absolute | planes | per_value | per_frequency
    average: str  # slots | per_map
    kernel: str  # jnp | fused (jax.nn.dot_product_attention) | pallas (the plane kernel)
    implementation: Optional[str] = None  # fused: "xla" or "cudnn"; pallas: its target, "gpu" or "tpu"
    chunk: int = 0  # sequences per chunk on the jnp path (0: all at once)

    @property
    def mapped(self) -> bool:
        return self.rope in ("planes", "per_value", "per_frequency")


def rope_formulation(info: MapInfo, encoding: Encoding, choice: str = "auto") -> str:
    """How RoPE is applied: "none" (no RoPE), "absolute" (every map is a multiple of ``j - i``), else "planes",
    "per_value" or "per_frequency" (``encoding`` module doc).

    ``choice="auto"`` picks by the size of the intermediate, counted in logit-sized planes per sequence and
    head: the plane cover writes L planes, per-value one per distinct value (U), per-frequency ``rope_dim``
    per map for each of its M maps. For integer maps: planes when L < U, else per value when ``U <= M *
    rope_dim`` (one matrix product instead of elementwise passes, so a tie goes to it). Fractional maps always
    take per-frequency."""
    if choice not in MAPPED_ROPE:
        raise ValueError(f"mapped_rope must be one of {MAPPED_ROPE}, got {choice!r}")
    if not encoding.rope_dim:
        return "none"
    if info.linear:
        return "absolute"
    if choice in ("planes", "per_value") and not info.integer:
        raise ValueError(f"mapped_rope={choice!r} needs integer position maps (these have fractional values)")
    if choice != "auto":
        return choice
    if not info.integer:
        return "per_frequency"
    values = len(info.values)
    if len(info.planes) < values:
        return "planes"
    return "per_value" if values <= info.num_maps * encoding.rope_dim else "per_frequency"


def rope_path(maps: np.ndarray, encoding: Encoding, choice: str = "auto") -> str:
    """:func:`rope_formulation` of explicit NumPy maps ``[M, N, N]``."""
    return rope_formulation(info_of_array(maps), encoding, choice)


def map_average_of(info: MapInfo, choice: str = "auto", rope: str = "none") -> str:
    """"slots" or "per_map" (``average`` module doc); "auto": slots where the maps take fewer distinct values per
    entry than there are maps. Several maps that are each a multiple of ``j - i`` keep one softmax per map
    (their slots would not be)."""
    if choice not in MAP_AVERAGES:
        raise ValueError(f"map_average must be one of {MAP_AVERAGES}, got {choice!r}")
    if rope == "absolute" and info.num_maps > 1:
        return "per_map"
    if choice != "auto":
        return choice
    return "slots" if info.num_slots < info.num_maps else "per_map"


def token_kernel(info: MapInfo, encoding: Encoding, frame_mask: bool, static_mask: bool, token_mask: bool,
                 implementation: Optional[str], backend: Optional[str] = None) -> str:
    """How token-level attention (T > 1 tokens per frame, frame maps ``info``) runs, one of ``TOKEN_KERNELS``:

    * "sparse": the block-sparse Pallas kernel (``kernels.sparse``: only the key frames each query frame keeps,
      mapped RoPE in the kernel) -- ``"pallas"`` on GPUs (interpreted on a CPU), and ``"auto"`` on GPUs where
      ``SPARSE_AUTO_ON_GPU`` and the method maps positions or masks frames (else cuDNN stays);
    * "splash": splash attention with the frame mask as its block mask (``kernels.splash``) -- ``"pallas"`` and
      ``"auto"`` on TPUs where the mask is known before run time (``static_mask``: no IFS keyframes) and the one
      map is a multiple of ``j - i`` (an absolute rotation);
    * "frames": one fused call per query frame (``kernels.fused.attend_fused_frames``) -- ``"xla"`` / ``"cudnn"``
      where the method maps positions or masks frames;
    * "tokens": the frame maps and mask expanded to tokens and planned by :func:`make_plan` -- everything else,
      and always with T5 biases, relative tables or an extra token mask (``token_mask``)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    backend = backend or jax.default_backend()
    if encoding.t5_buckets or encoding.rel_distance or token_mask:
        return "tokens"
    splash = backend == "tpu" and static_mask and info.linear and info.num_maps == 1
    acts = not info.linear or info.num_maps > 1 or frame_mask  # the method maps positions or masks frames
    if implementation == "pallas":
        return "splash" if splash else "tokens" if backend == "tpu" else "sparse"
    if implementation == "auto":
        if splash:
            return "splash"
        if backend == "gpu" and acts:  # never the token maps: at Wan's 4x they are [126k x 126k] per map
            return "sparse" if SPARSE_AUTO_ON_GPU else "frames"
        return "tokens"
    return "frames" if implementation in ("xla", "cudnn") and acts else "tokens"


def cudnn_takes(dtype, head_dim: int) -> bool:
    """Whether cuDNN's flash attention takes inputs of ``dtype`` (bfloat16 / float16) and ``head_dim`` (a
    multiple of 8)."""
    return jnp.dtype(dtype).name in ("bfloat16", "float16") and head_dim % 8 == 0


def fused_implementation(implementation: Optional[str], dtype: str, head_dim: int,
                         backend: Optional[str] = None) -> str:
    """The ``jax.nn.dot_product_attention`` implementation of the "frames" token kernel: "auto" takes cuDNN
    where it takes the input (a GPU, bfloat16 / float16, head dim a multiple of 8), else XLA; "xla" and
    "cudnn" stay."""
    if implementation != "auto":
        return implementation
    backend = backend or jax.default_backend()
    return "cudnn" if backend == "gpu" and cudnn_takes(dtype, head_dim) else "xla"


@functools.lru_cache(maxsize=512)
def make_plan(info: MapInfo, encoding: Encoding, sequences: int, heads: int, head_dim: int, dtype: str,
              has_rel: tuple[bool, bool], implementation: Optional[str] = None, chunk_bytes: Optional[int] = None,
              mapped_rope: str = "auto", map_average: str = "auto", backend: Optional[str] = None) -> AttentionPlan:
    """The plan of an attention call over ``sequences`` sequences of N frames, ``heads`` heads of ``head_dim``
    in ``dtype`` (a NumPy dtype name).

    Kernels: "pallas" takes the plane kernel where RoPE is mapped, maps are integer and there are no relative
    K/V tables, at any length (else the jnp path: nothing for the kernel to save; on GPUs, calls without mapped
    RoPE take cuDNN as under "auto"); "xla"/"cudnn" take ``jax.nn.dot_product_attention`` where RoPE is an
    absolute rotation and there is no relative V table. "auto" picks per backend: on GPUs the plane kernel where
    it applies (up to ``PALLAS_AUTO_MAX_FRAMES``), cuDNN fused attention for the rest where cuDNN takes the input
    (bfloat16/float16, head dim a multiple of 8), else jnp; on TPUs the plane kernel (Mosaic) where it applies,
    else jnp; jnp on CPUs.
    The jnp path under mapped RoPE is chunked over sequences so that its intermediate (L planes, U values or
    ``rope_dim`` per map, plus the slot average's exps and weights) stays under ``chunk_bytes`` (None: 1 GiB
    on accelerators, 16 MiB on a CPU)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    backend = backend or jax.default_backend()
    rope = rope_formulation(info, encoding, mapped_rope)
    average = map_average_of(info, map_average, rope)
    mapped = rope in ("planes", "per_value", "per_frequency")
    rel_k, rel_v = has_rel
    if implementation == "auto":
        implementation = None
        if backend == "gpu":
            cudnn_input = cudnn_takes(dtype, head_dim)
            kernel_fits = info.num_frames <= PALLAS_AUTO_MAX_FRAMES
            implementation = ("pallas" if kernel_fits else None) if mapped else "cudnn" if cudnn_input else None
        elif backend == "tpu":
            implementation = "pallas" if mapped and info.num_frames <= PALLAS_AUTO_MAX_FRAMES else None
    if implementation == "pallas" and not mapped and backend == "gpu" and cudnn_takes(dtype, head_dim):
        implementation = "cudnn"  # the kernel is for mapped positions: the rest runs as under "auto"
    if implementation == "pallas" and mapped and info.integer and not (rel_k or rel_v):
        return AttentionPlan(rope, average, "pallas", "tpu" if backend == "tpu" else "gpu")
    if implementation in ("xla", "cudnn") and not rel_v and not mapped:
        return AttentionPlan(rope, average, "fused", implementation)
    if not mapped:
        return AttentionPlan(rope, average, "jnp")
    if chunk_bytes is None:
        chunk_bytes = CPU_CHUNK_BYTES if backend == "cpu" else ACCELERATOR_CHUNK_BYTES
    planes = {"planes": len(info.planes or ()), "per_value": len(info.values)}.get(rope, encoding.rope_dim)
    if average == "slots":  # and the exps and weights of each of its V slots
        planes += 2 * info.num_slots
    n = info.num_frames
    batch = max(1, min(sequences, chunk_bytes // (4 * heads * n * n * planes)))
    return AttentionPlan(rope, average, "jnp", chunk=0 if batch >= sequences else batch)

"""The temporal-attention core shared by every model family and every long-video method.

``temporal_attention(q, k, v, encoding=..., method=...)`` works on ``[..., N, heads, dim]``: attention over the N
frames, independently for every leading index (video x pixel). What differs between methods is only their parts
(``jaxlongvid.methods``): the relative-position maps ``P[m, i, j]`` that every position encoding reads instead of
``j - i``, the mask (static, or built from IFS keyframes at run time), and the merge (the average of the
softmax probabilities over the M maps, FreeNoise window fusion, or FreeLong's spectral blend).

The package reads top to bottom:

* ``maps``: the maps' static facts (``MapInfo``, from the 2N-1 distances) and the jnp functions that derive
  value indices, plane indices and slots from the maps inside the program;
* ``encoding``: the position terms under maps (RoPE absolute / per value / per frequency / planes, T5 bucket
  bias, relative K/V tables) and the logits;
* ``average``: the masked softmax and LongDiff's average over maps (the exact 2-slot form and its checked
  fallback);
* ``plan``: ``AttentionPlan`` -- RoPE formulation, map average, kernel, chunking -- decided once per call's
  (maps, shapes, backend, options), cached by value;
* ``reference``: the plain jnp path (chunked over sequences); ``kernels``: ``fused``
  (``jax.nn.dot_product_attention``: cuDNN on NVIDIA GPUs), ``plane`` (the Pallas plane kernel: Triton on
  GPUs, Mosaic on TPUs, interpreted on a CPU), and for token-level attention under frame masks ``sparse`` (the
  block-sparse Pallas kernel: Triton on GPUs, interpreted on a CPU) and ``splash`` (splash attention on TPUs);
* ``merges``: FreeNoise and FreeLong; ``core``: ``temporal_attention`` and the single-layer analysis functions;
  ``module``: the Flax ``TemporalAttention``.

Maps and masks are built in the program from iotas (the parts' formulas with ``xp=jax.numpy``): a compiled
program captures no map-sized constant, so its size and compile time do not grow with N^2 (``benchmarks/
lowering_scale.py``). Softmax and the probability average run in float32 whatever the compute dtype; masked keys
get exactly zero probability.
"""

from jaxlongvid.attention.average import SLOT_GAP_LIMIT, slot_average
from jaxlongvid.attention.core import (attend, attention_logsumexp, attention_probabilities, merge_passes,
                                           probe_statistics, temporal_attention)
from jaxlongvid.attention.encoding import Encoding, logits, rotate
from jaxlongvid.attention.maps import (MapInfo, info_of_array, info_of_positions, map_slots, plane_cover,
                                           slot_maps)
from jaxlongvid.attention.module import TemporalAttention
from jaxlongvid.attention.plan import (AttentionPlan, make_plan, map_average_of, rope_formulation,
                                           rope_path)

__all__ = ["SLOT_GAP_LIMIT", "AttentionPlan", "Encoding", "MapInfo", "TemporalAttention", "attend",
           "attention_logsumexp", "attention_probabilities", "info_of_array", "info_of_positions", "logits",
           "make_plan", "map_average_of", "map_slots", "merge_passes", "plane_cover", "probe_statistics",
           "rope_formulation", "rope_path", "rotate", "slot_average", "slot_maps", "temporal_attention"]

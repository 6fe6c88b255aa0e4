"""The Flax module that every model's temporal attention uses."""

from __future__ import annotations

from typing import Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxlongvid import sharding
from jaxlongvid.attention.core import probe_statistics, temporal_attention
from jaxlongvid.attention.encoding import Encoding
from jaxlongvid.keyframes import select_keyframes
from jaxlongvid.methods import Method, MethodPlan


class TemporalAttention(nn.Module):
    """Multi-head self-attention over frames of a ``[B, N, h, w, C]`` video tensor (channels last).

    Parameters (names follow the PyTorch originals so converters are rename tables): ``to_q``, ``to_k``,
    ``to_v`` (no bias by default), ``to_out`` (with bias), and, per the encoding, ``t5_bias`` ``[buckets,
    heads]``, ``rel_k`` / ``rel_v`` ``[2R+1, head_dim]``. Normalisation before the attention belongs to the
    calling block, which passes its un-normalised input as ``features`` for IFS keyframe selection.

    Under a mesh with a ``frames`` axis the sequences are resharded over pixels for the attention (every
    query needs every frame), and the caller's layout is restored by the compiler afterwards.
    """

    num_heads: int
    head_dim: int
    encoding: Encoding = Encoding()
    # this layer's Method, or a resolved MethodPlan: the layer then runs plan.for_layer(its own path), the path
    # of the module inside the model ("/".join(self.path): the names of temporal_layer_names)
    method: Union[Method, MethodPlan] = Method("direct")
    qkv_bias: bool = False
    out_bias: bool = True
    implementation: Optional[str] = None
    dtype: jnp.dtype = jnp.float32  # compute dtype; softmax statistics stay float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, features: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        b, n, h, w, c = x.shape
        inner = self.num_heads * self.head_dim
        seq = jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(b, h * w, n, c)
        seq = sharding.constrain(seq, P(sharding.DATA, sharding.FRAMES))

        def project(name, bias):
            y = nn.Dense(inner, use_bias=bias, dtype=self.dtype, name=name)(seq)
            return y.reshape(b, h * w, n, self.num_heads, self.head_dim)

        q, k, v = project("to_q", self.qkv_bias), project("to_k", self.qkv_bias), project("to_v", self.qkv_bias)
        enc = self.encoding
        t5 = rel_k = rel_v = None
        if enc.t5_buckets:
            t5 = self.param("t5_bias", nn.initializers.normal(0.02), (enc.t5_buckets, self.num_heads))
        if enc.rel_distance:
            rows = 2 * enc.rel_distance + 1
            init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
            rel_k = self.param("rel_k", init, (rows, self.head_dim))
            rel_v = self.param("rel_v", init, (rows, self.head_dim))
        keyframes = None
        method = self.layer_method()
        if method.needs_keyframes:
            f = x if features is None else features
            f = f.reshape(b, n, h * w, f.shape[-1])  # [B, N, hw, C]
            segments = method.mask.segments(n, enc.native_frames)
            keyframes = jax.vmap(lambda one: select_keyframes(one, segments))(f)[:, None, :]  # [B, 1, n]
        if self.is_mutable_collection("intermediates"):  # layer probing only (jaxlongvid.probing)
            self._sow_probe_statistics(method, q, k, t5, rel_k, keyframes)
        out = temporal_attention(q, k, v, encoding=enc, method=method, t5_table=t5, rel_k=rel_k,
                                 rel_v=rel_v, keyframes=keyframes, spatial_shape=(h, w),
                                 implementation=self.implementation)
        out = nn.Dense(c, use_bias=self.out_bias, dtype=self.dtype, name="to_out")(
            out.reshape(b, h * w, n, inner))
        return jnp.transpose(out.reshape(b, h, w, n, c), (0, 3, 1, 2, 4))

    def layer_method(self) -> Method:
        """The Method this layer runs (its own, or its plan's for the module's path)."""
        if isinstance(self.method, MethodPlan):
            return self.method.for_layer("/".join(self.path))
        return self.method

    def _sow_probe_statistics(self, method: Method, q, k, t5, rel_k, keyframes):
        """FreeLOC's layer-probing statistics (``core.probe_statistics``), sown only while ``intermediates`` is
        mutable (``apply(..., mutable=["intermediates"])``), so ordinary calls compute none of this."""
        stats = probe_statistics(q, k, encoding=self.encoding, method=method, t5_table=t5, rel_k=rel_k,
                                 keyframes=keyframes)
        for name, value in stats.items():
            self.sow("intermediates", name, value)

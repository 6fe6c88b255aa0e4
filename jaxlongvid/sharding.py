"""Mesh construction and sharding constraints for the frame axis.

Sharding is declared, not hand-coded: the sampler runs under ``jax.set_mesh(mesh)`` with a ``frames`` axis
(and optionally ``data`` for the classifier-free-guidance pair), and model code marks where activations
should live with :func:`constrain`. Outside a mesh, or on a mesh without these axes, ``constrain`` is the
identity, so the same model code runs unsharded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, PartitionSpec as P

FRAMES = "frames"
DATA = "data"


def make_mesh(frames: int, data: int = 1, devices=None) -> jax.sharding.Mesh:
    """A ``(frames, data)`` mesh with automatic (compiler-propagated) sharding."""
    return jax.make_mesh((frames, data), (FRAMES, DATA), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


def constrain(x: jax.Array, spec: P) -> jax.Array:
    """``with_sharding_constraint(x, spec)`` under an active mesh that has the named axes; else ``x``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    names = {a for part in spec if part is not None for a in ((part,) if isinstance(part, str) else part)}
    if not names <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, spec)


# ---- token-level self-attention on tokens split over frames (context parallelism) -----------------------------------
# A DiT keeps its token sequence [B, S, C] split over the "frames" axis by blocks of whole frames (tokens are laid
# out frame by frame). Self-attention needs every key for every query; two ways to give it that:
#   "heads": an all-to-all over heads under shard_map (attend_over_heads): each device gets all S tokens of
#            heads / n heads, the attention core runs on them unchanged (heads are independent, so every method
#            -- maps, masks, merges -- works as it is), and a second all-to-all restores the token split. Needs
#            the heads, the tokens and the batch to split evenly;
#   "xla":   the compiler's automatic partitioning of the attention (in practice it gathers k and v on every
#            device). Used where "heads" cannot split, with the reason recorded in the plan.
# A ring (k, v passed round the devices with log-sum-exp merges) is not offered: LongDiff's average over several
# maps has no single log-sum-exp per query, so it would not serve every method.
CONTEXT_PARALLEL = ("auto", "heads", "xla")


@dataclass(frozen=True)
class SequenceParallel:
    """How a token-level self-attention runs under the active mesh (:func:`sequence_parallel`, once per call)."""

    kind: str = "none"  # none (no frames axis of > 1 device) | heads | xla (see the notes above)
    devices: int = 1  # the frames axis' size
    reason: str = ""  # why "xla" was taken where "auto" was asked for


def sequence_parallel(heads: int, tokens: int, batch: int, choice: str = "auto") -> SequenceParallel:
    """The plan of a self-attention over ``tokens`` tokens of ``heads`` heads and ``batch`` sequences, split over
    the active mesh's ``frames`` axis (and the batch over ``data``). ``choice``: "auto" (heads where they split
    evenly, else xla), "heads" (an error if they cannot) or "xla"."""
    if choice not in CONTEXT_PARALLEL:
        raise ValueError(f"context_parallel must be one of {CONTEXT_PARALLEL}, got {choice!r}")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or FRAMES not in mesh.axis_names or axis_size(mesh, FRAMES) == 1:
        return SequenceParallel()
    n, data = axis_size(mesh, FRAMES), axis_size(mesh, DATA)
    problems = [f"{heads} heads do not split over the {n} devices of the {FRAMES!r} axis" if heads % n else "",
                f"{tokens} tokens do not split over the {n} devices of the {FRAMES!r} axis" if tokens % n else "",
                f"a batch of {batch} does not split over the {data} devices of the {DATA!r} axis"
                if batch % data else "",
                f"the mesh has no {DATA!r} axis" if DATA not in mesh.axis_names else ""]
    reason = "; ".join(p for p in problems if p)
    if choice == "heads" and reason:
        raise ValueError(f"context_parallel='heads' cannot split this attention: {reason}")
    if choice == "xla" or reason:
        return SequenceParallel("xla", n, reason or "asked for")
    return SequenceParallel("heads", n)


def attend_over_heads(attend, q, k, v, *extras):
    """``attend(q, k, v, *extras)`` computed on whole sequences for ``q, k, v [B, S, heads, d]`` split over
    ``frames`` on S (and ``data`` on B), returning ``[B, S, heads, d']`` split the same way: under ``shard_map``
    an all-to-all gives each device all S tokens of ``heads / n`` heads, ``attend`` runs on them unchanged and a
    second all-to-all gives back the token split. ``extras``: per-sequence arrays ``[B, ...]`` (split over
    ``data`` only), e.g. IFS keyframes. Takes the active mesh; plan with :func:`sequence_parallel` first."""
    tokens = P(DATA, FRAMES)

    def local(q, k, v, *extras):
        to_heads = lambda x: jax.lax.all_to_all(x, FRAMES, split_axis=2, concat_axis=1, tiled=True)
        out = attend(to_heads(q), to_heads(k), to_heads(v), *extras)
        return jax.lax.all_to_all(out, FRAMES, split_axis=1, concat_axis=2, tiled=True)

    return jax.shard_map(local, in_specs=(tokens,) * 3 + (P(DATA),) * len(extras), out_specs=tokens)(
        q, k, v, *extras)


# ---- the sampler's mesh and global arrays -----------------------------------------------------------------------
# Only global-array APIs are used below (NamedSharding, jax.make_array_from_callback, process_allgather), so the
# same code runs on one host or, after ``jax.distributed.initialize()``, on many: every process calls
# ``jaxlongvid.sample`` with the same arguments, builds the same mesh over ``jax.devices()`` (all processes'
# devices) and gets the whole video back.
VIDEO = P(DATA, FRAMES)  # [B, F, H, W, C]: batch over "data", frames over "frames"


def mesh_for_devices(devices, guided: bool = True) -> jax.sharding.Mesh:
    """A mesh over ``devices`` (a count of the first ``jax.devices()``, or a sequence of devices).

    With classifier-free guidance and an even count, the cond/uncond pair gets a ``data`` axis of 2 and the
    rest goes to ``frames``; otherwise every device is on ``frames``.
    """
    available = jax.devices()
    if isinstance(devices, bool) or not isinstance(devices, (int, np.integer)):
        devices = list(devices)
        if not devices:
            raise ValueError("devices is empty")
    else:
        if devices < 1:
            raise ValueError(f"devices must be >= 1, got {devices}")
        if devices > len(available):
            raise ValueError(f"asked for {devices} devices but only {len(available)} are visible "
                             f"({available[0].platform}); on CPU, set XLA_FLAGS="
                             f"--xla_force_host_platform_device_count={devices} before jax starts")
        devices = available[:devices]
    count = len(devices)
    data = 2 if guided and count % 2 == 0 else 1
    return make_mesh(count // data, data, devices=devices)


def axis_size(mesh, name: str) -> int:
    return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(name, 1) if mesh is not None else 1


def normalise_mesh(mesh, axes: tuple = (FRAMES, DATA)):
    """Any mesh a user builds -> the sampler's ``(frames, data)`` mesh with automatic axes, over the same devices.

    ``axes`` names the user's frame axis and, optionally, the guidance-pair axis (default ``("frames",
    "data")``). Explicit or auto axis types, one or two axes and axes of size 1 are accepted (JAX's
    ``jax.make_mesh((8,), ("frames",))`` is explicit since JAX 0.7; the sampler's reshapes need automatic
    sharding propagation, so the axes are rebuilt as ``AxisType.Auto``). Any other axis of more than one
    device is refused here, before anything is traced.
    """
    if mesh is None:
        return None
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((8,), ('frames',))), "
                        f"got {type(mesh).__name__}")
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    if not 1 <= len(axes) <= 2 or len(set(axes)) != len(axes):
        raise ValueError(f"mesh_axes must name the frame axis and optionally the data axis, got {axes}")
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    unknown = sorted(a for a, n in sizes.items() if a not in axes and n > 1)
    if unknown:
        raise ValueError(f"the mesh has axes {sizes}; the sampler shards frames over {axes[0]!r}"
                         + (f" and the guidance pair over {axes[1]!r}" if len(axes) > 1 else "")
                         + f", and cannot use {unknown} (pass mesh_axes=(frame axis, data axis) to name yours)")
    order = [mesh.axis_names.index(a) for a in axes if a in sizes]
    rest = [i for i in range(len(mesh.axis_names)) if i not in order]
    devices = np.transpose(mesh.devices, order + rest)
    frames, data = sizes.get(axes[0], 1), sizes.get(axes[1], 1) if len(axes) > 1 else 1
    return jax.sharding.Mesh(devices.reshape(frames, data), (FRAMES, DATA), axis_types=(AxisType.Auto,) * 2)


def check_mesh(mesh, num_frames: int, batch: int, video_frames: Optional[int] = None) -> None:
    """Clear errors, before anything is traced, when the video does not split evenly over the (normalised) mesh.

    ``num_frames`` counts the frames the denoiser runs on; ``video_frames``, when the VAE codes several video
    frames per latent frame (Wan), the user's count they come from (named in the message)."""
    if mesh is None:
        return
    frames = axis_size(mesh, FRAMES)
    if num_frames % frames:
        latent = video_frames is not None and video_frames != num_frames
        what = f"num_frames={video_frames} ({num_frames} latent frames)" if latent else f"num_frames={num_frames}"
        raise ValueError(f"{what} is not divisible by the mesh's {FRAMES!r} axis ({frames} "
                         f"devices); frames are split evenly over devices (padding would change the attention), "
                         f"so use a multiple of {frames} {'latent ' if latent else ''}frames or another mesh")
    data = axis_size(mesh, DATA)
    if batch % data:
        raise ValueError(f"the model batch of {batch} (prompts x 2 with guidance) is not divisible by the mesh's "
                         f"{DATA!r} axis ({data} devices)")


def named(mesh, spec: P = P()):
    """``NamedSharding(mesh, spec)``; None without a mesh."""
    return None if mesh is None else jax.sharding.NamedSharding(mesh, spec)


def put(x, sharding_or_none):
    """A host array as a global ``jax.Array`` with that sharding (every process passes the same ``x``)."""
    x = np.asarray(x)
    if sharding_or_none is None:
        return jnp.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding_or_none, lambda index: x[index])


def put_tree(tree, sharding_or_none):
    return jax.tree_util.tree_map(lambda x: put(x, sharding_or_none), tree)


def to_host(x) -> np.ndarray:
    """The whole of a (possibly multi-host) global array as NumPy, on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

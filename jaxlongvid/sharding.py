"""Mesh construction and sharding constraints for the frame axis.

Sharding is declared, not hand-coded: the sampler runs under ``jax.set_mesh(mesh)`` with a ``frames`` axis
(and optionally ``data`` for the classifier-free-guidance pair), and model code marks where activations
should live with :func:`constrain`. Outside a mesh, or on a mesh without these axes, ``constrain`` is the
identity, so the same model code runs unsharded.
"""

from __future__ import annotations

import jax
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

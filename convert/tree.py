"""Checking a converted parameter tree against the Flax model's own ``jax.eval_shape`` tree."""

from __future__ import annotations

from typing import Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from convert.readers import CheckpointError


def flat_shapes(tree: Mapping) -> dict[str, tuple[int, ...]]:
    """``{"a/b/kernel": shape}`` for a nested dict of arrays or ShapeDtypeStructs."""
    return {"/".join(k): tuple(v.shape) for k, v in flatten_dict(dict(tree)).items()}


def validate(converted: Mapping[str, np.ndarray], expected: Mapping, what: str, max_listed: int = 20) -> dict:
    """Compare flat ``{"a/b/kernel": array}`` with the expected nested shape tree; return the nested params.

    Missing leaves, unexpected leaves and shape mismatches are reported together in one error.
    """
    want = flat_shapes(expected)
    missing = sorted(set(want) - set(converted))
    extra = sorted(set(converted) - set(want))
    wrong = sorted(f"{k}: got {tuple(converted[k].shape)}, expected {want[k]}"
                   for k in set(want) & set(converted) if tuple(converted[k].shape) != want[k])
    problems = []
    for label, items in (("missing", missing), ("unexpected", extra), ("shape mismatch", wrong)):
        if items:
            shown = ", ".join(items[:max_listed]) + (f", ... ({len(items) - max_listed} more)"
                                                     if len(items) > max_listed else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise CheckpointError(f"{what}: converted parameters do not match the model: " + "; ".join(problems))
    return unflatten_dict({tuple(k.split("/")): v for k, v in converted.items()})


def unused_keys_error(what: str, unused: list[str], max_listed: int = 20) -> CheckpointError:
    shown = ", ".join(sorted(unused)[:max_listed])
    more = f", ... ({len(unused) - max_listed} more)" if len(unused) > max_listed else ""
    return CheckpointError(f"{what}: {len(unused)} checkpoint keys were not used by any rule: {shown}{more}")



"""The one conversion engine: PyTorch state dicts -> Flax params through rename tables.

Every converter describes its source as a :class:`Rules` value -- regex renames applied in order (the PyTorch
module path becomes the Flax one: ``blocks.0.attn1.to_q.weight`` -> ``blocks_0/attn1/to_q/kernel``; ``weight``
of a 1-D tensor is a norm ``scale``), an optional key prefix for whole-pipeline checkpoints, an optional key
rewrite for numbered blocks, and constants that are checked and dropped -- and calls :func:`convert_state`.

A kernel is laid out by :data:`KERNEL_LAYOUTS` from its PyTorch and Flax ranks (Linear ``[out, in]`` -> Dense
``[in, out]``; Conv1d / Conv2d with kernel 1 -> Dense; Conv2d ``[o, i, kh, kw]`` -> ``[kh, kw, i, o]``; Conv3d
``[o, i, kt, kh, kw]`` -> ``[kt, kh, kw, i, o]``); every other leaf (not a kernel) is copied, reshaped where it differs from the
model's leaf only by size-1 axes (a norm gain stored as ``[C, 1, 1, 1]``, a ``[1, 6, D]`` modulation table).

Everything is planned from key names and shapes first (no tensor read): checkpoint keys that no rule maps,
model parameters that nothing fills, and shape mismatches are reported together in one ``CheckpointError``
naming the file. Then tensors are read and converted one at a time (safetensors through ``safe_open``;
``.pt``/``.ckpt``/``.pth`` memory-mapped with ``torch.load(weights_only=True, mmap=True)``), so peak host memory
is about the output plus one tensor. Sources are single files, diffusers / transformers model folders and
sharded checkpoints (``*.index.json``, read shard by shard). Leaves are written in the requested dtype (float32 by
default); a tensor holding NaN or Inf, in the file or after the cast, is refused with every such leaf named.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from convert.readers import TORCH_SUFFIXES, CheckpointError, folder_weights_file, load_state_dict, shard_map
from convert.tree import flat_shapes, validate

# ---- kernel layouts: (PyTorch rank, Flax rank) -> (description, transform) ----------------------------------
KERNEL_LAYOUTS: dict[tuple[int, int], tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    (2, 2): ("Linear [out, in] -> Dense [in, out]", lambda w: w.T),
    (3, 2): ("Conv1d k=1 [out, in, 1] -> Dense [in, out]", lambda w: w[:, :, 0].T),
    (4, 2): ("Conv2d 1x1 [out, in, 1, 1] -> Dense [in, out]", lambda w: w[:, :, 0, 0].T),
    (4, 4): ("Conv2d [out, in, kh, kw] -> Conv [kh, kw, in, out]", lambda w: w.transpose(2, 3, 1, 0)),
    (5, 5): ("Conv3d [out, in, kt, kh, kw] -> Conv [kt, kh, kw, in, out]", lambda w: w.transpose(2, 3, 4, 1, 0)),
}


@dataclass(frozen=True)
class Rules:
    """How one source format's keys become Flax parameter paths (see the module docstring)."""

    title: str  # what the checkpoint holds, for messages: "LaVie UNet", "Wan transformer"
    renames: tuple[tuple[str, str], ...]
    prefix: str = ""  # the component's key prefix inside a whole-pipeline checkpoint
    rewrite: Optional[Callable[[str], Optional[str]]] = None  # applied first; None: the key has no parameter
    constants: tuple[tuple[str, Callable[[np.ndarray], Optional[str]]], ...] = ()  # checked, then dropped
    identify: Optional[Callable[[list], str]] = None  # keys -> a hint for the error message ("" for none)


def flax_path(key: str, rules: Rules, ndim: int) -> Optional[str]:
    """The Flax parameter path of a PyTorch key (without the family prefix), or None if no rule names it."""
    if rules.rewrite is not None:
        key = rules.rewrite(key)
        if key is None:
            return None
    for pattern, repl in rules.renames:
        key = re.sub(pattern, repl, key)
    key = re.sub(r"\.(\d+)(?=\.|$)", r"_\1", key)
    parts = key.split(".")
    if parts[-1] == "weight":
        parts[-1] = "scale" if ndim == 1 else "kernel"
    return "/".join(parts)


def _kernel_layout(src_shape: tuple[int, ...], dst_ndim: int):
    entry = KERNEL_LAYOUTS.get((len(src_shape), dst_ndim))
    if entry is None:
        return None
    if len(src_shape) > dst_ndim and any(s != 1 for s in src_shape[2:]):
        return None  # only a kernel-1 convolution is a Dense layer
    return entry[1]


def _squeezed(shape) -> tuple[int, ...]:
    return tuple(s for s in shape if s != 1)


def _reshape_to(shape: tuple[int, ...]):
    """A leaf that differs from the model's only by size-1 axes (``[C, 1, 1, 1]`` gain -> ``[C]``)."""
    return lambda w: w.reshape(shape)


def _converted_shape(transform, shape) -> tuple[int, ...]:
    return tuple(transform(np.broadcast_to(np.zeros((), np.float32), shape)).shape)


# ---- streaming checkpoint sources --------------------------------------------------------------------------------
class Source:
    """Key names and shapes up front; ``take(key)`` reads one tensor (and forgets it where it can)."""

    def __init__(self, name: str, shapes: dict[str, tuple[int, ...]], take: Callable[[str], np.ndarray]):
        self.name, self.shapes, self.take = name, shapes, take


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    import torch

    if value.dtype == torch.bfloat16:
        value = value.float()
    return value.detach().cpu().numpy()


def _safetensors_source(path: str) -> Source:
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(path, framework="numpy")
        slices = {k: f.get_slice(k) for k in f.keys()}
        shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
        bf16 = {k for k, s in slices.items() if s.get_dtype() == "BF16"}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None

    def take(key):
        try:
            if key in bf16:  # NumPy has no bfloat16: read this one through torch
                with safe_open(path, framework="pt") as g:
                    return _to_numpy(g.get_tensor(key))
            return f.get_tensor(key)
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({e})") from None

    return Source(path, shapes, take)


def _unwrap(obj, unwrap: tuple[str, ...]):
    if isinstance(obj, Mapping):
        for key in unwrap:
            if isinstance(obj.get(key), Mapping):
                return obj[key]
    return obj


def _mapping_source(name: str, state: Mapping, consume: bool) -> Source:
    tensors = {k: v for k, v in state.items() if hasattr(v, "shape") and hasattr(v, "dtype")}
    if not tensors:
        raise CheckpointError(f"{name}: contains no tensors")
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    take = (lambda k: _to_numpy(tensors.pop(k))) if consume else (lambda k: _to_numpy(tensors[k]))
    return Source(name, shapes, take)


def _torch_source(path: str, unwrap: tuple[str, ...]) -> Source:
    import torch

    try:  # memory-mapped: tensors are read from the file when converted
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy (non-zip) file, unsafe pickle, corrupt file: let the reader decide and explain
        return _mapping_source(path, load_state_dict(path, unwrap=unwrap), consume=True)
    obj = _unwrap(obj, unwrap)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (a mapping of tensors), got {type(obj).__name__}")
    return _mapping_source(path, obj, consume=True)


def _sharded_source(index: str, unwrap: tuple[str, ...]) -> Source:
    """A sharded checkpoint (``*.safetensors.index.json`` / ``*.bin.index.json``): every shard opened lazily."""
    weight_map = shard_map(index)
    shards = {path: open_checkpoint(path, unwrap) for path in sorted(set(weight_map.values()))}
    lost = [k for k, path in weight_map.items() if k not in shards[path].shapes]
    if lost:
        raise CheckpointError(f"{index}: {len(lost)} keys of the index are not in their shard: {_listing(lost)}")
    owner = {}
    for path, shard in shards.items():
        for key in shard.shapes:
            if key in owner:
                raise CheckpointError(f"{index}: key {key!r} is in two shards: {owner[key]} and {path}")
            owner[key] = path
    shapes = {k: shards[p].shapes[k] for k, p in owner.items()}
    return Source(index, shapes, lambda key: shards[owner[key]].take(key))


def open_checkpoint(source, unwrap: tuple[str, ...] = ("state_dict", "ema")) -> Source:
    """A file path (``.safetensors``, ``.pt``, ``.pth``, ``.ckpt``, ``.bin``), a sharded checkpoint's
    ``.index.json``, a diffusers / transformers model folder, or an in-memory state dict."""
    if isinstance(source, Mapping):
        return _mapping_source("<state dict>", _unwrap(source, unwrap), consume=False)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = folder_weights_file(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if path.endswith(".index.json"):
        return _sharded_source(path, unwrap)
    if path.endswith(".safetensors"):
        return _safetensors_source(path)
    if path.endswith(TORCH_SUFFIXES):
        return _torch_source(path, unwrap)
    raise CheckpointError(f"{path}: unknown checkpoint format; expected .safetensors, .index.json, a model folder "
                          f"or one of {TORCH_SUFFIXES}")


# ---- the conversion -----------------------------------------------------------------------------------------------
def _listing(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def plan_conversion(shapes: Mapping[str, tuple[int, ...]], rules: Rules, expected_tree: Mapping,
                    name: str) -> dict:
    """``{checkpoint key: (flax path or None for a checked constant, transform)}`` from key names and shapes.

    Keys outside ``rules.prefix`` (when the checkpoint has it) belong to other components and are skipped.
    Raises one ``CheckpointError`` naming ``name`` for unmapped keys, unfilled parameters or wrong shapes.
    """
    expected = flat_shapes(expected_tree)
    keys = list(shapes)
    prefix = rules.prefix if rules.prefix and any(k.startswith(rules.prefix) for k in keys) else ""
    if prefix:  # whole-pipeline checkpoint: the other components' keys belong to other converters
        keys = [k for k in keys if k.startswith(prefix)]
    plan, unused, taken = {}, [], set()
    for key in keys:
        short, shape = key[len(prefix):], tuple(shapes[key])
        check = next((c for p, c in rules.constants if re.search(p, short)), None)
        if check is not None:
            plan[key] = (None, check)
            continue
        path = flax_path(short, rules, len(shape))
        if path is None or path not in expected or path in taken:
            unused.append(key)
            continue
        transform = _identity
        if path.endswith("/kernel"):  # a layout, never a mere reshape (a square 1x1 conv must be transposed)
            transform = _kernel_layout(shape, len(expected[path]))
            if transform is None:
                unused.append(f"{key} {list(shape)} (cannot become a kernel of shape {list(expected[path])})")
                continue
        elif shape != expected[path] and _squeezed(shape) == _squeezed(expected[path]):
            transform = _reshape_to(expected[path])
        plan[key] = (path, transform)
        taken.add(path)
    missing = sorted(set(expected) - taken)
    if unused or missing:
        hint = rules.identify(keys) if rules.identify is not None else ""
        problems = []
        if unused:
            problems.append(f"{len(unused)} checkpoint keys match no {rules.title} parameter: {_listing(unused)}")
        if missing:
            problems.append(f"{len(missing)} model parameters have no checkpoint key: {_listing(missing)}")
        raise CheckpointError(f"{name}: not a {rules.title} checkpoint for this config{hint}; "
                              + "; ".join(problems))
    produced = {p: np.broadcast_to(np.zeros((), np.float32), _converted_shape(t, shapes[k]))
                for k, (p, t) in plan.items() if p is not None}
    validate(produced, expected_tree, f"{name} ({rules.title})")  # shapes, before any tensor is read
    return plan


def _identity(w):
    return w


OUTPUT_DTYPES = ("float32", "bfloat16", "float16")


def convert_state(source: Source, rules: Rules, expected_tree: Mapping, dtype="float32") -> dict:
    """Plan (names and shapes, no data read), then convert ``source`` one tensor at a time into ``dtype``
    (one of :data:`OUTPUT_DTYPES`). Leaves holding NaN or Inf (in the file, or after the cast: a bfloat16 weight
    past float16's range) are refused in one error naming them all."""
    dtype = np.dtype(jnp.dtype(dtype))
    if dtype.name not in OUTPUT_DTYPES:
        raise CheckpointError(f"output dtype {dtype.name} is not supported; choose one of {OUTPUT_DTYPES}")
    plan = plan_conversion(source.shapes, rules, expected_tree, source.name)
    what = f"{source.name} ({rules.title})"
    flat, bad = {}, []
    for key, (path, transform) in plan.items():
        value = np.asarray(source.take(key))
        if path is None:
            problem = transform(value.astype(np.float32))
            if problem:
                raise CheckpointError(f"{what}: {key}: {problem}")
            continue
        if not np.issubdtype(value.dtype, np.floating):
            raise CheckpointError(f"{what}: {key} has dtype {value.dtype}, expected floating point weights")
        if not np.isfinite(value).all():
            bad.append(f"{key} -> {path}")
            continue
        with np.errstate(over="ignore"):  # an overflow is reported below, by name
            leaf = np.ascontiguousarray(transform(value), dtype=dtype)
        del value
        if not np.isfinite(leaf).all():
            bad.append(f"{key} -> {path} (overflows {dtype.name})")
            continue
        flat[path] = leaf
    if bad:
        raise CheckpointError(f"{what}: {len(bad)} tensors hold NaN or Inf: {_listing(bad)}")
    return validate(flat, expected_tree, what)

"""Reading PyTorch checkpoints safely.

``.safetensors`` is read with NumPy alone (no torch import). ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` are read
with ``torch.load(weights_only=True)``, which refuses pickles that would run arbitrary code; anything else is
rejected. Tensors come back as float32-or-native NumPy arrays keyed by their state-dict names.

Model folders in the diffusers / transformers layout (``config.json`` + one weights file, or shards listed in an
``.index.json``) are read with :func:`read_config_json` and :func:`read_folder_weights`.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Mapping

import numpy as np

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")  # diffusers, transformers names


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: unreadable, unsafe, wrong family, or wrong keys/shapes."""


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.detach().cpu().numpy()


def load_state_dict(path: str | os.PathLike, unwrap: tuple[str, ...] = ("state_dict",)) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint as ``{key: array}``.

    ``unwrap``: top-level keys whose value is the real state dict (``{"state_dict": ...}`` in Lightning
    checkpoints, ``{"ema": ...}`` in LaVie's); the first one present is taken.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if not path.endswith(TORCH_SUFFIXES):
        raise CheckpointError(f"{path}: unknown checkpoint format; expected .safetensors or one of {TORCH_SUFFIXES}")
    check_torch_file(path)
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the pickle needs more than tensors and plain containers "
            f"(weights_only=True), so it could run arbitrary code ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:  # a damaged pickle stream
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return _flatten_state(obj, path, unwrap)


def check_torch_file(path: str) -> None:
    """Refuse a file that cannot be a ``torch.save`` output before unpickling it: those are zip archives
    (``PK\\x03\\x04``, PyTorch >= 1.6) or, in the legacy format, a pickle of protocol 2 or more (``\\x80``)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":
        text = all(32 <= b < 127 or b in b"\t\r\n" for b in head)
        kind = "an empty file" if not head else ("text" if text else f"starts with {head[:4]!r}")
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({kind}; torch.save writes a zip archive or a "
                              f"binary pickle)")


def _flatten_state(obj, path: str, unwrap: tuple[str, ...]) -> dict[str, np.ndarray]:
    import torch

    if isinstance(obj, Mapping):
        for key in unwrap:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (a mapping of tensors), got {type(obj).__name__}")
    out = {k: _torch_to_numpy(v) for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise CheckpointError(f"{path}: contains no tensors")
    return out


def iter_prefixed(state: Mapping[str, np.ndarray], prefix: str) -> Iterator[tuple[str, np.ndarray]]:
    """``(key without prefix, value)`` for every key that starts with ``prefix``."""
    for k, v in state.items():
        if k.startswith(prefix):
            yield k[len(prefix):], v


def as_float32(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Floating tensors as float32 (checkpoints are often fp16); params are kept in float32."""
    return {k: np.asarray(v, np.float32) if np.issubdtype(v.dtype, np.floating) else np.asarray(v)
            for k, v in state.items()}


# ---- diffusers / transformers model folders ---------------------------------------------------------------------
def read_json(path: str) -> dict:
    """A JSON file's contents; a missing or malformed file is a CheckpointError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None


def read_config_json(folder: str) -> dict:
    """A model folder's ``config.json``."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no config.json (expected a diffusers/transformers model folder)")
    return read_json(path)


def folder_weights_file(folder: str) -> str:
    """The weights file of a diffusers / transformers model folder, in order of preference: a single weights file
    (safetensors, then .bin; full precision, then ``.fp16``) or a sharded one's ``.index.json``."""
    tried = []
    for variant in ("", ".fp16"):
        for ext in (".safetensors", ".bin"):
            for stem in WEIGHT_STEMS:
                name = f"{stem}{variant}{ext}"
                tried.append(name)
                for candidate in (name, name + ".index.json"):
                    if os.path.isfile(os.path.join(folder, candidate)):
                        return os.path.join(folder, candidate)
    raise CheckpointError(f"{folder}: no weights file; looked for {', '.join(tried)} (and sharded .index.json)")


def shard_map(index: str) -> dict[str, str]:
    """``{key: shard path}`` of a sharded checkpoint's ``.index.json`` (paths relative to its folder)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map (expected a sharded-checkpoint index)")
    folder = os.path.dirname(index)
    return {k: os.path.join(folder, v) for k, v in weight_map.items()}


def read_folder_weights(folder: str) -> dict[str, np.ndarray]:
    """The state dict of a diffusers / transformers model folder (see :func:`folder_weights_file`)."""
    path = folder_weights_file(folder)
    return _read_shards(path) if path.endswith(".index.json") else load_state_dict(path)


def _read_shards(index: str) -> dict[str, np.ndarray]:
    state = {}
    for shard in sorted(set(shard_map(index).values())):
        state.update(load_state_dict(shard))
    return state

"""``convert.readers``: diffusers / transformers model folders (``read_config_json``, ``read_folder_weights``:
single files in their order of preference, fp16 variants, sharded checkpoints) and ``as_float32``; bad folders
give one CheckpointError naming the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from convert.readers import CheckpointError, as_float32, read_config_json, read_folder_weights

A = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
B = {"b.bias": np.full((3,), 2.0, np.float16), "b.steps": np.arange(3, dtype=np.int64)}


def assert_state(got, want):
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
        assert got[k].dtype == want[k].dtype, k


def test_single_file_in_order_of_preference(tmp_path):
    torch.save({k: torch.from_numpy(v) for k, v in B.items()}, tmp_path / "pytorch_model.bin")
    assert_state(read_folder_weights(str(tmp_path)), B)  # .bin when there is nothing else
    save_file(A, tmp_path / "model.fp16.safetensors")
    assert_state(read_folder_weights(str(tmp_path)), B)  # full-precision files come before .fp16 variants
    save_file(A, tmp_path / "model.safetensors")
    assert_state(read_folder_weights(str(tmp_path)), A)  # safetensors before .bin
    save_file(B, tmp_path / "diffusion_pytorch_model.safetensors")
    assert_state(read_folder_weights(str(tmp_path)), B)  # diffusers' name first


def test_sharded_folder(tmp_path):
    save_file(A, tmp_path / "model-00001-of-00002.safetensors")
    save_file(B, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in A},
                  **{k: "model-00002-of-00002.safetensors" for k in B}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_state(read_folder_weights(str(tmp_path)), {**A, **B})


def test_bad_folders(tmp_path):
    with pytest.raises(CheckpointError, match=r"no weights file; looked for diffusion_pytorch_model\.safetensors"):
        read_folder_weights(str(tmp_path))
    with pytest.raises(CheckpointError, match="no config.json"):
        read_config_json(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not a readable JSON file"):
        read_config_json(str(tmp_path))
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    assert read_config_json(str(tmp_path)) == {"hidden_size": 8}
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"index\.json: no weight_map"):
        read_folder_weights(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"gone\.safetensors: no such file"):
        read_folder_weights(str(tmp_path))


def test_as_float32_keeps_integers():
    out = as_float32(B)
    assert out["b.bias"].dtype == np.float32 and out["b.steps"].dtype == np.int64
    np.testing.assert_array_equal(out["b.bias"], B["b.bias"].astype(np.float32))

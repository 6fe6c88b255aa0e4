"""``convert.rules``, the one conversion engine: sources (files, model folders, sharded checkpoints with an
index), size-1 reshapes, the output dtype, and refusing NaN / Inf with every such leaf named."""

from __future__ import annotations

import json

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from convert.readers import CheckpointError
from convert.rules import Rules, convert_state, open_checkpoint, plan_conversion

RULES = Rules(title="toy model", renames=((r"^blk\.", "block."),))
RNG = np.random.default_rng(0)
STATE = {  # PyTorch names and layouts
    "blk.proj.weight": RNG.standard_normal((4, 3)).astype(np.float32),  # Linear [out, in]
    "blk.proj.bias": RNG.standard_normal(4).astype(np.float32),
    "blk.norm.gamma": RNG.standard_normal((4, 1, 1, 1)).astype(np.float32),  # an RMS gain kept 4-D in PyTorch
    "table": RNG.standard_normal((1, 6, 4)).astype(np.float32),  # a modulation table with a batch axis
}
EXPECTED = {"block": {"proj": {"kernel": jax.ShapeDtypeStruct((3, 4), np.float32),
                               "bias": jax.ShapeDtypeStruct((4,), np.float32)},
                      "norm": {"gamma": jax.ShapeDtypeStruct((4,), np.float32)}},
            "table": jax.ShapeDtypeStruct((6, 4), np.float32)}


def check(params, dtype=np.float32):
    np.testing.assert_array_equal(params["block"]["proj"]["kernel"], STATE["blk.proj.weight"].T.astype(dtype))
    np.testing.assert_array_equal(params["block"]["norm"]["gamma"], STATE["blk.norm.gamma"].reshape(4).astype(dtype))
    np.testing.assert_array_equal(params["table"], STATE["table"][0].astype(dtype))
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(dtype)}


def test_size_one_axes_are_reshaped_but_nothing_else():
    check(convert_state(open_checkpoint(STATE), RULES, EXPECTED))
    wrong = {**STATE, "table": np.zeros((6, 1, 2, 2), np.float32)}  # same size, not only size-1 axes apart
    with pytest.raises(CheckpointError, match=r"shape mismatch: table: got \(6, 1, 2, 2\), expected \(6, 4\)"):
        convert_state(open_checkpoint(wrong), RULES, EXPECTED)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_output_dtype(dtype):
    check(convert_state(open_checkpoint(STATE), RULES, EXPECTED, dtype=dtype), dtype)


def test_unsupported_output_dtype():
    with pytest.raises(CheckpointError, match="output dtype int8 is not supported"):
        convert_state(open_checkpoint(STATE), RULES, EXPECTED, dtype="int8")


def test_nan_and_inf_are_refused_naming_every_leaf():
    bad = dict(STATE)
    bad["blk.proj.bias"] = np.array([0, np.nan, 0, 0], np.float32)
    bad["table"] = np.full((1, 6, 4), np.inf, np.float32)
    with pytest.raises(CheckpointError, match=r"2 tensors hold NaN or Inf: blk\.proj\.bias -> block/proj/bias, "
                                              r"table -> table"):
        convert_state(open_checkpoint(bad), RULES, EXPECTED)
    big = {**STATE, "blk.proj.bias": np.array([0, 1e6, 0, 0], np.float32)}  # fine in float32, not in float16
    with pytest.raises(CheckpointError, match=r"blk\.proj\.bias -> block/proj/bias \(overflows float16\)"):
        convert_state(open_checkpoint(big), RULES, EXPECTED, dtype=np.float16)
    check(convert_state(open_checkpoint(big), RULES, EXPECTED, dtype=ml_dtypes.bfloat16), ml_dtypes.bfloat16)


def write_shards(folder, stem="diffusion_pytorch_model", torch_format=False):
    keys = sorted(STATE)
    parts = {f"{stem}-00001-of-00002": keys[:2], f"{stem}-00002-of-00002": keys[2:]}
    ext = ".bin" if torch_format else ".safetensors"
    for name, part in parts.items():
        if torch_format:
            torch.save({k: torch.from_numpy(STATE[k]) for k in part}, folder / (name + ext))
        else:
            save_file({k: STATE[k] for k in part}, folder / (name + ext))
    index = folder / f"{stem}{ext}.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: n + ext for n, p in parts.items() for k in p}}))
    return index


@pytest.mark.parametrize("torch_format", [False, True])
def test_sharded_checkpoint_and_folder(tmp_path, torch_format):
    index = write_shards(tmp_path, torch_format=torch_format)
    source = open_checkpoint(index)
    assert source.shapes == {k: v.shape for k, v in STATE.items()}
    check(convert_state(source, RULES, EXPECTED))
    check(convert_state(open_checkpoint(tmp_path), RULES, EXPECTED))  # the folder finds its index


def test_single_file_folder(tmp_path):
    save_file(STATE, tmp_path / "model.safetensors")
    check(convert_state(open_checkpoint(tmp_path), RULES, EXPECTED))


def test_bad_sharded_checkpoints(tmp_path):
    index = write_shards(tmp_path)
    table = json.loads(index.read_text())
    table["weight_map"]["ghost.weight"] = "diffusion_pytorch_model-00001-of-00002.safetensors"
    index.write_text(json.dumps(table))
    with pytest.raises(CheckpointError, match=r"1 keys of the index are not in their shard: ghost\.weight"):
        open_checkpoint(index)
    table["weight_map"]["ghost.weight"] = "missing.safetensors"
    index.write_text(json.dumps(table))
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: no such file"):
        open_checkpoint(index)
    del table["weight_map"]["ghost.weight"]
    first = sorted(STATE)[:2]
    save_file({**{k: STATE[k] for k in first}, "table": STATE["table"]},
              tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors")
    index.write_text(json.dumps(table))  # now "table" is in both shards
    with pytest.raises(CheckpointError, match="key 'table' is in two shards"):
        open_checkpoint(index)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: no weights file"):
        open_checkpoint(tmp_path / "empty")


def test_plan_reads_no_tensor():
    source = open_checkpoint(STATE)
    source.take = None  # planning must not read
    plan = plan_conversion(source.shapes, RULES, EXPECTED, "toy")
    assert {k: p for k, (p, _) in plan.items()} == {"blk.proj.weight": "block/proj/kernel",
                                                    "blk.proj.bias": "block/proj/bias",
                                                    "blk.norm.gamma": "block/norm/gamma", "table": "table"}


def test_square_one_by_one_conv_is_transposed_not_reshaped():
    w = RNG.standard_normal((3, 3, 1, 1)).astype(np.float32)  # Conv2d 1x1 [out, in, 1, 1] -> Dense [in, out]
    expected = {"proj": {"kernel": jax.ShapeDtypeStruct((3, 3), np.float32)}}
    params = convert_state(open_checkpoint({"proj.weight": w}), Rules("toy", ()), expected)
    np.testing.assert_array_equal(params["proj"]["kernel"], w[:, :, 0, 0].T)

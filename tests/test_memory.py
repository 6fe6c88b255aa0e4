"""The memory estimate (``jaxlongvid.memory``): each model family's own terms, and the CLI's refusal."""

import dataclasses

import numpy as np
import pytest

from jaxlongvid import memory
from jaxlongvid.models import wan
from jaxlongvid.models.unet3d import UNet3DConfig
from jaxlongvid.models.vae import VAEConfig
from jaxlongvid.pipeline import PipelineConfig
from tiny_wan import tiny_wan_pipeline


def unet_estimate_before_family_terms(config, num_frames, height, width, method, devices=1, prompts=1, guided=True,
                                      weight_bytes=0):
    """The UNet estimate as memory.py computed it before the terms moved to the denoiser's module (its constants
    were calibrated: the move must not change a byte)."""
    from jaxlongvid.methods import FreeNoiseWindows, MethodPlan, TimePlan, get_method

    unet = config.unet
    levels = [(2 ** i, h) for i, (on, h) in enumerate(zip(unet.attention_levels, unet.attention_heads)) if on]
    levels += [(1, unet.temporal_in_heads)] if unet.temporal_in else []
    method = get_method(method)
    phases = [m for _, m in method.phases] if isinstance(method, TimePlan) else [method]
    layer_methods = [x for p in phases for x in
                     ([p.default, *(m for _, m in p.layers)] if isinstance(p, MethodPlan) else [p])]
    batch = prompts * (2 if guided else 1)
    h, w = max(1, height // config.latent_factor), max(1, width // config.latent_factor)
    native = config.native_frames or num_frames
    keys = max(min(num_frames, m.merge.window) if isinstance(m.merge, FreeNoiseWindows) else num_frames
               for m in layer_methods)
    maps = max(len(m.positions.mapped(np.zeros(1, np.int32), num_frames, native, np)) for m in layer_methods)
    attention = max(3 * batch * (h // s) * (w // s) * heads * num_frames * keys * 4 * maps
                    for s, heads in levels or [(1, 1)])
    activations = 32 * batch * num_frames * h * w * unet.block_channels[0] * 4
    return int(weight_bytes + 700 * 2**20 + (attention + activations) / devices)


UNETS = {
    "lavie": PipelineConfig(family="lavie", unet=UNet3DConfig.lavie(), text=None, vae=VAEConfig()),
    "videocrafter1": PipelineConfig(family="videocrafter1", unet=UNet3DConfig.videocrafter1(), text=None,
                                    vae=VAEConfig()),  # temporal attention on the input too
    "pixel": PipelineConfig(family="tiny", text=None, unet=UNet3DConfig(
        block_channels=(32, 64), attention_levels=(False, True), attention_heads=(1, 2), in_channels=3,
        out_channels=3, norm_groups=8, native_frames=16)),
}


@pytest.mark.parametrize("name", sorted(UNETS))
@pytest.mark.parametrize("method,frames,devices,guided", [("direct", 16, 1, True), ("freenoise", 128, 2, False),
                                                          ("longdiff", 96, 4, True), ("freeloc", 4096, 1, True)])
def test_unet_estimate_is_unchanged(name, method, frames, devices, guided):
    config = UNETS[name]
    request = dict(num_frames=frames, height=320, width=512, method=method, devices=devices, guided=guided,
                   weight_bytes=12345)
    expected = unet_estimate_before_family_terms(config, **request)
    for backend in ("cpu", "gpu"):  # the UNet terms read no backend
        assert memory.estimate_bytes(config, backend=backend, **request) == expected


def test_dit_estimate_counts_tokens():
    config = tiny_wan_pipeline().config  # 4 heads of 12, patch (1, 2, 2), pixel space, float32
    dit = config.unet
    # 8 latent frames of 16 x 16 pixels: 8 x 8 x 8 = 512 tokens against 512 keys, 4 heads, 2 (guidance), 4 copies
    assert wan.attention_bytes(dit, 8, 8, 1, 16, 16, 2, backend="cpu", dtype="float32", implementation="auto") \
        == 4 * 2 * 4 * 512 * 512 * 4
    assert wan.activation_bytes(dit, 8, 16, 16, 2) == 2 * 512 * (8 * 48 + 2 * 32) * 4
    estimate = lambda c=config, frames=8, size=32, method="direct": memory.estimate_bytes(
        c, frames, size, size, method, backend="cpu")
    assert estimate() < estimate(frames=16) < estimate(frames=32)  # more frames: more tokens
    assert estimate() < estimate(size=64)  # larger frames: more tokens per frame
    finer = dataclasses.replace(config, unet=dataclasses.replace(dit, patch_size=(1, 1, 1)))
    assert estimate(c=finer) > estimate()  # smaller patches: more tokens
    # attention grows with the square of the tokens: 4x the tokens, 16x the logits (runtime aside)
    extra = lambda **kw: estimate(**kw) - memory.RUNTIME_BYTES
    assert extra(size=64) > 10 * extra()
    # FreeNoise sees its window of frames: fewer keys than all 32
    assert estimate(frames=32, method="freenoise") < estimate(frames=32)


def test_dit_attention_on_chip_on_gpus_in_half_precision():
    args = (wan.WanConfig.wan_1_3b(), 21, 21, 1, 60, 104, 2)  # 81 frames at 480 x 832, 128-wide heads
    for implementation in ("auto", "cudnn", "pallas"):
        assert wan.attention_bytes(*args, backend="gpu", dtype="bfloat16", implementation=implementation) == 0
    forming = [dict(backend="gpu", dtype="float32", implementation="auto"),  # jnp over all tokens (direct)
               dict(backend="gpu", dtype="bfloat16", implementation="xla"),
               dict(backend="cpu", dtype="bfloat16", implementation="auto")]
    for kernel in forming:
        assert wan.attention_bytes(*args, **kernel) == wan.attention_bytes(*args, backend="cpu", dtype="float32",
                                                                           implementation="auto") > 0
    # 12-wide heads (the tiny DiT) are not cuDNN's input: the logits are formed on a GPU too
    tiny = (tiny_wan_pipeline().config.unet,) + args[1:]
    assert wan.attention_bytes(*tiny, backend="gpu", dtype="bfloat16", implementation="auto") == \
        wan.attention_bytes(*tiny, backend="cpu", dtype="bfloat16", implementation="auto") > 0


def test_cli_refuses_an_impossible_wan_request(tmp_path, monkeypatch, capsys):
    import re

    import jaxlongvid.pipeline as pipeline_lib
    from jaxlongvid import cli

    directory = pipeline_lib.save(tiny_wan_pipeline(), str(tmp_path / "wan"))
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 2 * 10**9)
    monkeypatch.setattr(pipeline_lib, "load", lambda name: pytest.fail("loaded the pipeline after the check"))
    code = cli.main(["sample", "--model", directory, "--prompt", "a red circle moving left", "--frames", "4096",
                     "--method", "direct", "--height", "32", "--width", "32", "--out", str(tmp_path / "v.gif")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    found = re.search(r"--frames 4096: estimated (\d+\.\d) GB per device, .* 2\.0 GB available; about (\d+) frames "
                      r"fit on 1 device\(s\) at 32x32", err)
    assert found, err
    fit = int(found.group(2))
    config = pipeline_lib.load_config(directory)
    request = dict(height=32, width=32, method="direct", guided=True,
                   weight_bytes=memory.folder_bytes(f"{directory}/{pipeline_lib.PARAMS_DIR}"))
    assert 1 <= fit < 4096
    assert memory.estimate_bytes(config, fit, **request) <= 2 * 10**9 < memory.estimate_bytes(config, fit + 1,
                                                                                               **request)


def test_a_denoiser_module_without_the_terms_is_named():
    from jaxlongvid.models.text import TextConfig

    with pytest.raises(ValueError, match=r"^jaxlongvid.models.text defines no attention_bytes\(\) beside TextConfig: "
                                         r"cannot estimate its memory$"):
        memory.denoiser_functions(TextConfig())

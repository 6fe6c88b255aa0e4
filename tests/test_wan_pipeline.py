"""The Wan2.1 pipeline end to end on the CPU: a tiny diffusers Wan folder built here (``WanTransformer3DModel``
saved sharded, ``AutoencoderKLWan``, ``UMT5EncoderModel`` with a ``tokenizer.json`` trained by the ``tokenizers``
library, a UniPC flow scheduler) converted through ``jaxlongvid convert wan --diffusers``; the converted pipeline
against the torch components (denoiser <= 1e-4 relative, decode <= 1e-4, text <= 1e-5), sampled through the CLI
and ``jaxlongvid.sample`` (deterministic for a seed, ``1 + 4 (F - 1)`` frames, other counts refused), sharded over
8 host devices == unsharded; partial folders (denoiser-only, no VAE) and the original release layout
(``tests/fixtures/wan``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxlongvid as jlv
from jaxlongvid import cli, sharding
from jaxlongvid import pipeline as pipeline_lib

torch = pytest.importorskip("torch")
FIXTURES = Path(__file__).parent / "fixtures" / "wan"
Z = 4  # latent channels of the tiny VAE
TEXT = dict(vocab_size=90, d_model=20, d_ff=24, num_heads=2, d_kv=8, num_layers=2, relative_attention_num_buckets=8,
            relative_attention_max_distance=16, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)
DIT = dict(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=12, in_channels=Z, out_channels=Z,
           text_dim=TEXT["d_model"], freq_dim=16, ffn_dim=20, num_layers=2, rope_max_seq_len=4)
CORPUS = ["a red circle bouncing on the floor", "two blue squares spin slowly", "a cat jumps over a fence"] * 3
PROMPT = "a red circle bouncing"
SMALL = dict(height=32, width=16, num_inference_steps=2, seed=3, progress=False)
FRAMES = 13  # 4 latent frames: one per device of the mesh's frames axis in test_sharded_equals_unsharded


def randomise(model, scale: float = 0.3):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return model.eval()


@pytest.fixture(scope="module")
def torch_parts():
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    transformer = randomise(WanTransformer3DModel(**DIT))
    vae = AutoencoderKLWan(base_dim=8, z_dim=Z, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                           latents_std=[0.8, 1.2, 1.0, 1.5]).eval()
    text = UMT5EncoderModel(UMT5Config(**TEXT)).eval()
    with torch.no_grad():
        for name, p in text.named_parameters():
            if "relative_attention_bias" in name:
                p.normal_(0.0, 0.5)
    return transformer, vae, text


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory, torch_parts):
    """A diffusers Wan pipeline folder with every part."""
    from diffusers import UniPCMultistepScheduler
    from tokenizers import SentencePieceUnigramTokenizer

    transformer, vae, text = torch_parts
    folder = tmp_path_factory.mktemp("wan_diffusers")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    transformer.save_pretrained(folder / "transformer", max_shard_size="10KB")
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    tok = SentencePieceUnigramTokenizer()
    tok.train_from_iterator(CORPUS, vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                            show_progress=False)
    (folder / "tokenizer").mkdir()
    tok.save(str(folder / "tokenizer" / "tokenizer.json"))
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                            num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    return folder


@pytest.fixture(scope="module")
def converted(wan_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("wan_out") / "wan"
    assert cli.main(["convert", "wan", "--diffusers", str(wan_folder), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def pipe(converted):
    return jlv.load(str(converted))


def rel_err(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def test_converted_pipeline_config_and_round_trip(pipe):
    c = pipe.config
    assert c.family == "wan" and c.missing == () and c.temporal_factor == 4
    assert type(c.unet).__name__ == "WanConfig" and type(c.text).__name__ == "UMT5Config"
    assert type(c.vae).__name__ == "WanVAEConfig" and c.spatial_factor == 16
    assert (c.scheduler.kind, c.scheduler.flow_shift) == ("unipc-flow", 3.0)
    assert (c.num_frames, c.height, c.width, c.guidance_scale) == (81, 480, 832, 5.0)
    again = pipeline_lib.PipelineConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c and hash(again) == hash(c)
    assert c.latent_frames(81) == 21 and c.latent_frames(1) == 1
    with pytest.raises(ValueError, match=r"num_frames=80: this wan model makes 1 \+ 4k frames .* use 77 or 81"):
        c.latent_frames(80)


def test_info_describes_the_wan_pipeline(converted, capsys):
    assert cli.main(["info", "--model", str(converted)]) == 0
    out = capsys.readouterr().out
    assert "family: wan" in out and "WanConfig" in out and "text: UMT5Config; VAE: WanVAEConfig" in out
    assert "scheduler: unipc-flow (flow matching), shift 3.0" in out
    assert "defaults: 81 frames (21 latent), 480x832, 50 steps, guidance 5.0" in out


def test_pipeline_contracts_match_the_torch_parts(pipe, torch_parts):
    transformer, vae, text = torch_parts
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 3, 4, 2, Z)).astype(np.float32)  # [B, F, H, W, 16-like]
    t = np.array([999.0, 412.5], np.float32)
    context = rng.standard_normal((2, 7, TEXT["d_model"])).astype(np.float32)
    with torch.no_grad():
        want = transformer(torch.from_numpy(latents).permute(0, 4, 1, 2, 3), torch.from_numpy(t),
                           torch.from_numpy(context), return_dict=False)[0].permute(0, 2, 3, 4, 1).numpy()
    got = jax.jit(pipe.denoiser)(latents, t, context)  # jitted: one compile instead of op-by-op dispatch
    assert got.shape == latents.shape and rel_err(got, want) < 1e-4

    mean = torch.tensor(vae.config.latents_mean).view(1, Z, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, Z, 1, 1, 1)
    with torch.no_grad():
        frames = vae.decode(torch.from_numpy(latents[:1]).permute(0, 4, 1, 2, 3) * std + mean).sample
    want = frames.clamp(-1, 1).permute(0, 2, 3, 4, 1).numpy()
    got = np.asarray(pipe.decode(latents[:1]))  # chunked decoding equals whole: tests/test_wan_vae.py
    assert got.shape == (1, 1 + 4 * 2, 32, 16, 3) == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)

    ids, mask = pipe.tokenizer.encode(["a red circle", "two blue squares spin"])
    assert ids.shape == (2, 512)
    with torch.no_grad():
        hidden = text(torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask.astype(np.int64)))
    want = hidden.last_hidden_state.numpy() * mask[..., None]
    got = np.asarray(pipe.encode_prompts(["a red circle", "two blue squares spin"]))
    assert rel_err(got, want) < 1e-5
    assert not got[1, mask[1].sum():].any()  # rows past the prompt are zero, as Wan pads the context


def test_sample_python_and_cli_deterministic(pipe, converted, tmp_path, capsys):
    from jaxlongvid import video

    first = jlv.sample(pipe, PROMPT, num_frames=FRAMES, **SMALL)
    second = jlv.sample(pipe, PROMPT, num_frames=FRAMES, **SMALL)
    assert first.shape == (FRAMES, 32, 16, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, second)
    assert first.std() > 2  # a picture, not a constant
    other = jlv.sample(pipe, PROMPT, num_frames=FRAMES, **dict(SMALL, seed=4))
    assert np.any(other != first)

    out = tmp_path / "wan.png"
    code = cli.main(["sample", "--model", str(converted), "--prompt", PROMPT, "--frames", str(FRAMES), "--height",
                     "32", "--width", "16", "--steps", "2", "--seed", "3", "--no-progress", "--out", str(out)])
    assert code == 0 and f"{FRAMES} frames" in capsys.readouterr().out
    import imageio.v3 as iio

    np.testing.assert_array_equal(iio.imread(out)[..., :3], video.contact_sheet(first))


def test_frame_counts_other_than_4k_plus_1_are_refused(pipe, converted, no_tracing, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"num_frames=10: this wan model makes 1 \+ 4k frames .* use 9 or 13"):
        jlv.sample(pipe, PROMPT, num_frames=10, **SMALL)
    code = cli.main(["sample", "--model", str(converted), "--prompt", PROMPT, "--frames", "12", "--out",
                     str(tmp_path / "x.gif")])
    err = capsys.readouterr().err
    assert code == 1 and "num_frames=12" in err and "1 + 4k" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.gif").exists()


def test_sharded_equals_unsharded(pipe):
    """Latent frames 4 over a (frames 4, data 2) mesh of 8 host devices; the causal VAE decodes the gathered
    latents. uint8 frames (the unsharded programs are those of test_sample_python_and_cli_deterministic): at most
    one level apart where float32 rounding of the other partitioning crosses a rounding boundary."""
    assert len(jax.devices()) >= 8
    kw = dict(num_frames=FRAMES, **SMALL)
    single = jlv.sample(pipe, PROMPT, **kw)
    sharded = jlv.sample(pipe, PROMPT, mesh=sharding.make_mesh(4, 2), **kw)
    assert single.shape == sharded.shape == (FRAMES, 32, 16, 3)
    diff = np.abs(single.astype(int) - sharded.astype(int))
    print(f"wan sharded vs unsharded: max diff {diff.max()} levels, {np.mean(diff > 0):.1e} of values differ")
    assert diff.max() <= 1 and np.mean(diff > 0) < 1e-2


def test_latent_frames_not_divisible_by_the_mesh(pipe, no_tracing):
    """The mesh splits latent frames: 17 video frames make 5, which 4 frame devices cannot split."""
    with pytest.raises(ValueError, match=r"num_frames=17 \(5 latent frames\) is not divisible by the mesh's "
                                         r"'frames' axis \(4 devices\).* multiple of 4 latent frames"):
        jlv.sample(pipe, PROMPT, num_frames=17, mesh=sharding.make_mesh(4, 2), **SMALL)


def partial_folder(wan_folder: Path, target: Path, parts) -> Path:
    target.mkdir()
    for part in parts:
        shutil.copytree(wan_folder / part, target / part)
    return target


def test_denoiser_only_and_no_vae_folders(wan_folder, pipe, tmp_path, capsys):
    only = partial_folder(wan_folder, tmp_path / "only", ["transformer"])
    assert cli.main(["convert", "wan", "--diffusers", str(only), "--out", str(tmp_path / "a")]) == 0
    bare = jlv.load(str(tmp_path / "a"))
    assert bare.config.missing == ("vae", "text") and bare.tokenizer is None
    assert bare.config.scheduler == pipe.config.scheduler  # no scheduler/: SchedulerConfig.wan()
    x = np.random.default_rng(1).standard_normal((1, 2, 2, 2, Z)).astype(np.float32)
    ctx = np.zeros((1, 3, TEXT["d_model"]), np.float32)
    np.testing.assert_array_equal(np.asarray(bare.denoiser(x, np.array([500.0]), ctx)),
                                  np.asarray(pipe.denoiser(x, np.array([500.0]), ctx)))
    with pytest.raises(ValueError, match="no vae and no text .*runs pipe.denoiser but cannot sample"):
        jlv.sample(bare, PROMPT, num_frames=9, output="latents", **SMALL)
    with pytest.raises(ValueError, match="no VAE .*cannot decode"):
        bare.decode(x)

    no_vae = partial_folder(wan_folder, tmp_path / "novae", ["transformer", "text_encoder", "tokenizer"])
    assert cli.main(["convert", "wan", "--diffusers", str(no_vae), "--out", str(tmp_path / "b")]) == 0
    text_only = jlv.load(str(tmp_path / "b"))
    assert text_only.config.missing == ("vae",)
    np.testing.assert_array_equal(text_only.encode_prompts([PROMPT]), pipe.encode_prompts([PROMPT]))
    with pytest.raises(ValueError, match="no vae .*cannot sample"):
        jlv.sample(text_only, PROMPT, num_frames=9, **SMALL)

    lone_text = partial_folder(wan_folder, tmp_path / "lone", ["transformer", "text_encoder"])
    assert cli.main(["convert", "wan", "--diffusers", str(lone_text), "--out", str(tmp_path / "c")]) == 1
    assert "text_encoder/ and tokenizer/ go together" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_bad_folders_write_nothing(wan_folder, tmp_path, capsys):
    cases = {"no_transformer": ["vae"], "bad_scheduler": ["transformer", "scheduler"]}
    for name, parts in cases.items():
        folder = partial_folder(wan_folder, tmp_path / name, parts)
        if name == "bad_scheduler":
            cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
            (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(cfg, use_flow_sigmas=False)))
        out = tmp_path / f"out_{name}"
        assert cli.main(["convert", "wan", "--diffusers", str(folder), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert ("no transformer/ folder" in err) if name == "no_transformer" else ("flow sigmas" in err)
        assert not out.exists() and not list(tmp_path.glob(f"*out_{name}*"))


# ---- the original release layout -----------------------------------------------------------------------------------
def release_folder(tmp_path: Path, vae: bool) -> Path:
    folder = tmp_path / "release"
    shutil.copytree(FIXTURES / "original_tiny", folder)
    (folder / "io.npz").unlink()
    if vae:
        shutil.copy(FIXTURES / "vae_tiny.pth", folder / "Wan2.1_VAE.pth")
    return folder


def test_original_layout_through_the_cli(tmp_path):
    folder = release_folder(tmp_path, vae=False)
    out = tmp_path / "wan_original"
    assert cli.main(["convert", "wan", "--original", str(folder), "--out", str(out)]) == 0
    pipe = jlv.load(str(out))
    assert pipe.config.missing == ("vae", "text") and pipe.config.scheduler.flow_shift == 5.0
    io = np.load(FIXTURES / "original_tiny" / "io.npz")
    got = pipe.denoiser(np.moveaxis(io["x"], 1, -1), io["t"].astype(np.float32), io["context"])
    assert rel_err(got, np.moveaxis(io["out"], 1, -1)) < 1e-4


def test_original_layout_with_its_vae(tmp_path):
    from convert.pipelines import wan_original_pipeline
    from jaxlongvid.models.wan_vae import WanVAEConfig

    c = json.loads((FIXTURES / "configs.json").read_text())["vae"]
    vae_config = WanVAEConfig(base_dim=c["dim"], z_dim=c["z_dim"], dim_mult=tuple(c["dim_mult"]),
                              num_res_blocks=c["num_res_blocks"], temporal_downsample=tuple(c["temperal_downsample"]),
                              latents_mean=tuple(c["latents_mean"]), latents_std=tuple(c["latents_std"]))
    pipe = wan_original_pipeline(release_folder(tmp_path, vae=True), vae_config=vae_config)
    assert pipe.config.missing == ("text",)
    data = np.load(FIXTURES / "vae_tiny.npz")
    got = np.asarray(pipe.decode(np.moveaxis(data["latents"], 1, -1), chunk=2))
    np.testing.assert_allclose(got, np.moveaxis(data["frames"], 1, -1), rtol=0, atol=1e-4)
    # the released VAE architecture (the default) does not fit the tiny file: one error naming it
    with pytest.raises(ValueError, match="Wan2.1_VAE.pth"):
        wan_original_pipeline(tmp_path / "release")


def test_convert_wan_needs_exactly_one_layout(tmp_path, capsys):
    with pytest.raises(SystemExit):  # argparse: one of --diffusers / --original is required
        cli.main(["convert", "wan", "--out", str(tmp_path / "x")])
    assert "one of the arguments --diffusers --original is required" in capsys.readouterr().err
    from convert.pipelines import convert_wan

    with pytest.raises(ValueError, match="exactly one of --diffusers DIR and --original DIR"):
        convert_wan(out=tmp_path / "x")

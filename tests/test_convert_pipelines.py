"""``jaxlongvid convert lavie | videocrafter | modelscope``: original checkpoints -> saved pipelines -> ``load``.

* LaVie (tiny fixture ``lavie_tiny.pt``) without ``--sd``: a denoiser-only pipeline whose ``pipe.denoiser``
  reproduces the original's ``out_f16`` (max |err| / max |ref|: tolerance 1e-4, measured ~1e-6), which
  ``sample`` refuses. With ``--sd`` (a tiny random diffusers SD folder built here): the tokenizer gives
  transformers' ids, ``encode_prompts`` matches ``CLIPTextModel`` (1e-5), ``decode`` matches diffusers'
  ``AutoencoderKL`` (1e-4), and ``jaxlongvid.sample`` runs end to end.
* VideoCrafter1 (safetensors) and VideoCrafter2 (.ckpt) tiny fixtures: denoiser-only, ``out_f16`` (1e-4).
  One ``.ckpt`` holding UNet + LDM VAE + OpenCLIP text tower + ``alphas_cumprod`` (VideoCrafter's layout): read
  once (one memory-mapped ``torch.load``), all three converted, the OpenCLIP tokenizer found next to it; the
  stored open_clip outputs are reproduced through ``encode_prompts`` (1e-5); a wrong noise schedule is refused.
  An inference YAML's UNet arguments, VAE ``ddconfig`` / ``scale_factor`` and text ``layer`` reach the configs.
* A tiny random diffusers ``TextToVideoSDPipeline`` folder (ModelScope layout): every component equals what the
  direct converters give (their parity is tested in test_unet_parity.py / test_vae_text.py), tokenizer ids equal
  transformers', scheduler and default size come from the folder.
* Bad input (wrong family, truncated file, unsafe pickle, wrong version, wrong folder, mismatched components,
  existing output): exit code 1, one line on stderr naming the file, and nothing written at ``--out``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel
from transformers import CLIPTokenizer as HFCLIPTokenizer

import jaxlongvid
from convert import pipelines
from convert.readers import CheckpointError
from convert.text import load_hf_text_encoder
from convert.unet import convert_modelscope_unet, convert_videocrafter_unet, videocrafter_config
from convert.vae import load_diffusers_vae, vae_config_from_diffusers
from jaxlongvid import cli
from jaxlongvid.models.text import TextConfig
from jaxlongvid.models.tokenizers import bytes_to_unicode
from jaxlongvid.models.vae import VAEConfig
from jaxlongvid.pipeline import apply_denoiser
from jaxlongvid.schedulers import SchedulerConfig, alphas_cumprod
from test_vae_text import (_diffusers_to_ldm, _openclip_fixture_state, _openclip_tiny_config,  # checked there
                           assert_same_tree)

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny"
LAVIE, VC1, VC2 = TINY / "lavie", TINY / "videocrafter1", TINY / "videocrafter2"
OPENCLIP = FIXTURES / "openclip_text_tiny"
NETWORK_TOL = 1e-4  # whole UNet / VAE against the original outputs (max |err| / max |ref|)
TEXT_TOL = 1e-5
PROMPT = "a prompt"


class NotAWeight:  # pickled into a checkpoint: loading it would need arbitrary code
    pass


def rel_err(got, want) -> float:
    want = np.asarray(want, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def channels_last(x):  # [B, C, F, H, W] -> [B, F, H, W, C]
    return np.moveaxis(np.asarray(x), 1, -1)


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@functools.cache
def jitted_denoiser(config):
    """One compiled denoiser per config (the call ``pipe.denoiser`` makes, jitted: eager runs are slower)."""
    return jax.jit(lambda params, x, t, c, fps: apply_denoiser(config, "direct", params, x, t, c, fps))


def denoiser_error(pipe, fixture: Path) -> float:
    io = np.load(fixture / "io.npz")
    out = jitted_denoiser(pipe.config)(pipe.params["unet"], channels_last(io["x_f16"]), io["t_f16"],
                                       io["context_f16"], io["fps_f16"] if "fps_f16" in io else None)
    return rel_err(out, channels_last(io["out_f16"]))


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Norm params and the originals' zero-initialised layers get random values, so no wrong mapping hides."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1 or not p.any():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


# ---- a tiny Stable-Diffusion-style folder: vae/, text_encoder/, tokenizer/ -----------------------------------------
def write_tokenizer(folder: Path, max_length: int = 16) -> HFCLIPTokenizer:
    """A CLIP BPE tokenizer over the 512 byte symbols, a few merges and the two special tokens."""
    symbols = list(bytes_to_unicode().values())
    merges = [("p", "r"), ("o", "m"), ("pr", "om"), ("p", "t</w>"), ("prom", "pt</w>")]
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    tokenizer = HFCLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_text_encoder(tokenizer, width: int) -> CLIPTextModel:
    torch.manual_seed(1)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return randomise(CLIPTextModel(config))


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """Tiny random SD-1.x-style components (latent 4 channels, x2 VAE, text width 32) saved as a diffusers folder."""
    folder = tmp_path_factory.mktemp("sd14")
    tokenizer = write_tokenizer(folder / "tokenizer")
    text_encoder = make_text_encoder(tokenizer, width=32)
    torch.manual_seed(0)
    vae = randomise(AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4))
    text_encoder.save_pretrained(folder / "text_encoder")
    vae.save_pretrained(folder / "vae")
    return dict(folder=folder, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae)


# ---- LaVie --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lavie_unet_only(tmp_path_factory):
    out = tmp_path_factory.mktemp("lavie") / "pipe"
    assert cli.main(["convert", "lavie", "--unet", str(LAVIE / "lavie_tiny.pt"), "--config",
                     str(LAVIE / "config.json"), "--out", str(out)]) == 0
    return out


def assert_openclip_context(pipe, label):
    """The pipeline's tokenizer gives open_clip's ids for the fixture prompts and its text context matches."""
    io = np.load(OPENCLIP / "io.npz")
    prompts = json.loads((OPENCLIP / "config.json").read_text())["prompts"]
    np.testing.assert_array_equal(pipe.tokenizer.encode(prompts), io["token_ids"])
    err = rel_err(pipe.encode_prompts(prompts), io["out_penultimate"])
    print(f"{label}: max rel err {err:.2e}")
    assert err < TEXT_TOL


def test_lavie_unet_only(lavie_unet_only):
    pipe = jaxlongvid.load(str(lavie_unet_only))
    c = pipe.config
    assert (c.family, c.missing, c.vae, c.text, pipe.tokenizer) == ("lavie", ("vae", "text"), None, None, None)
    assert c.scheduler == SchedulerConfig.lavie() and c.scheduler.kind == "ddim"
    assert (c.num_frames, c.height, c.width, c.guidance_scale, c.num_inference_steps) == (16, 320, 512, 7.5, 50)
    assert c.extra["converted_from"]["unet"] == str(LAVIE / "lavie_tiny.pt")
    err = denoiser_error(pipe, LAVIE)
    print(f"LaVie denoiser-only pipeline: max rel err {err:.2e}")
    assert err < NETWORK_TOL
    with pytest.raises(ValueError, match="no vae and no text .*cannot sample"):
        jaxlongvid.sample(pipe, PROMPT, num_frames=8, height=16, width=16, num_inference_steps=2)


def test_lavie_with_sd_components_samples(sd, lavie_unet_only, tmp_path, capsys):
    out = tmp_path / "pipe"
    code, stdout, _ = run_cli(["convert", "lavie", "--unet", LAVIE / "model.safetensors", "--sd", sd["folder"],
                               "--config", LAVIE / "config.json", "--out", out], capsys)
    assert code == 0 and f"wrote {out}" in stdout
    pipe = jaxlongvid.load(str(out))
    assert pipe.config.missing == () and pipe.config.vae.downsample_factor == 2
    assert_same_tree(pipe.params["unet"], jaxlongvid.load(str(lavie_unet_only)).params["unet"])  # .pt == safetensors

    ids = pipe.tokenizer.encode([PROMPT])
    want_ids = sd["tokenizer"]([PROMPT], padding="max_length", truncation=True, return_tensors="pt").input_ids
    np.testing.assert_array_equal(ids, want_ids.numpy())
    with torch.no_grad():
        want_context = sd["text_encoder"](want_ids).last_hidden_state.numpy()
    text_err = rel_err(pipe.encode_prompts([PROMPT]), want_context)

    z = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)  # [B, h, w, C]
    with torch.no_grad():
        want_images = sd["vae"].decode(torch.from_numpy(z).permute(0, 3, 1, 2) / pipe.config.vae.scaling_factor).sample
    vae_err = rel_err(pipe.decode(z), want_images.permute(0, 2, 3, 1).numpy())
    print(f"LaVie + SD folder: text max rel err {text_err:.2e}, VAE decode {vae_err:.2e}")
    assert text_err < TEXT_TOL and vae_err < NETWORK_TOL

    video = jaxlongvid.sample(pipe, PROMPT, num_frames=8, height=16, width=16, num_inference_steps=2, progress=False)
    assert video.shape == (8, 16, 16, 3) and video.dtype == np.uint8 and video.std() > 0


# ---- VideoCrafter -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version, ckpt", [(1, VC1 / "model.safetensors"), (2, VC2 / "model.ckpt")])
def test_videocrafter_unet_only(version, ckpt, tmp_path, capsys):
    out = tmp_path / "pipe"
    code, _, err = run_cli(["convert", "videocrafter", "--ckpt", ckpt, "--version", version, "--config",
                            ckpt.parent / "config.json", "--out", out], capsys)
    assert code == 0, err
    pipe = jaxlongvid.load(str(out))
    c = pipe.config
    assert (c.family, c.missing, c.scheduler) == (f"videocrafter{version}", ("vae", "text"),
                                                  SchedulerConfig.videocrafter())
    assert (c.guidance_scale, c.fps, c.height, c.width) == (12.0, 28 if version == 2 else None, 320, 512)
    err = denoiser_error(pipe, ckpt.parent)
    print(f"VideoCrafter{version} denoiser-only pipeline: max rel err {err:.2e}")
    assert err < NETWORK_TOL


def write_videocrafter_ckpt(folder: Path, vae: torch.nn.Module, schedule: np.ndarray) -> Path:
    """The tiny VideoCrafter2 UNet, an LDM-named VAE and the tiny OpenCLIP tower in one Lightning-style .ckpt."""
    state = dict(torch.load(VC2 / "model.ckpt", weights_only=True)["state_dict"])
    state.update({k: torch.from_numpy(v) for k, v in _openclip_fixture_state().items()})
    levels = len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        new = _diffusers_to_ldm(key, levels)
        if new.startswith(("encoder.mid.attn_1.", "decoder.mid.attn_1.")) and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        state["first_stage_model." + new] = value.clone()
    state["alphas_cumprod"] = torch.from_numpy(schedule)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "global_step": 1}, folder / "model.ckpt")
    return folder / "model.ckpt"


def test_videocrafter_one_checkpoint_all_components(sd, tmp_path, monkeypatch):
    ckpt = write_videocrafter_ckpt(tmp_path / "vc2", sd["vae"], alphas_cumprod(SchedulerConfig.videocrafter()))
    shutil.copy(OPENCLIP / pipelines.OPENCLIP_VOCAB, ckpt.parent)  # found next to the checkpoint
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    out = pipelines.convert_videocrafter(ckpt, 2, VC2 / "config.json", out=tmp_path / "pipe",
                                         vae_config=vae_config_from_diffusers(dict(sd["vae"].config)),
                                         text_config=_openclip_tiny_config(skip_last_layers=1))
    assert len(loads) == 1 and loads[0]["mmap"] is True, loads  # the checkpoint is read once, memory-mapped
    monkeypatch.undo()

    pipe = jaxlongvid.load(out)
    assert pipe.config.missing == () and pipe.config.fps == 28
    sd_vae = load_diffusers_vae(str(sd["folder"] / "vae"))[1]
    assert_same_tree(pipe.params["vae"], sd_vae)  # LDM names in the .ckpt == the diffusers folder's weights
    assert_openclip_context(pipe, "VideoCrafter .ckpt text tower through the pipeline")
    assert_same_tree(pipe.params["unet"], convert_videocrafter_unet(VC2 / "model.ckpt", 2, VC2 / "config.json")[1])

    wrong = write_videocrafter_ckpt(tmp_path / "wrong", sd["vae"], alphas_cumprod(SchedulerConfig.lavie()))
    with pytest.raises(CheckpointError, match=r"wrong/model\.ckpt: its alphas_cumprod .* differs from VideoCrafter2"):
        pipelines.videocrafter_pipeline(wrong, 2, VC2 / "config.json")
    if importlib.util.find_spec("open_clip") is None:  # else its bundled vocabulary is found
        alone = tmp_path / "alone"
        alone.mkdir()
        shutil.copy(ckpt, alone / "model.ckpt")
        with pytest.raises(CheckpointError, match=r"alone/model\.ckpt: holds the OpenCLIP text tower but no tok"):
            pipelines.videocrafter_pipeline(alone / "model.ckpt", 2, VC2 / "config.json",
                                            vae_config=vae_config_from_diffusers(dict(sd["vae"].config)),
                                            text_config=_openclip_tiny_config(1))


def test_videocrafter_cli_vocab_all_components(sd, tmp_path, monkeypatch, capsys):
    """``convert videocrafter --vocab PATH``: the OpenCLIP vocabulary is read from PATH (not next to the checkpoint,
    whatever open_clip is installed), the tokenizer gives open_clip's ids and the text context matches (1e-5); a
    missing PATH is a one-line error, exit 1, nothing written. The command converts the released architectures, so
    the tiny fixture configs stand in for SD's VAE and OpenCLIP ViT-H/14 here."""
    from jaxlongvid.models.tokenizers import CLIPTokenizer

    ckpt = write_videocrafter_ckpt(tmp_path / "vc2", sd["vae"], alphas_cumprod(SchedulerConfig.videocrafter()))
    vocab = tmp_path / "elsewhere" / "clip_vocab.txt.gz"
    vocab.parent.mkdir()
    shutil.copy(OPENCLIP / pipelines.OPENCLIP_VOCAB, vocab)
    assert not (ckpt.parent / pipelines.OPENCLIP_VOCAB).exists()
    monkeypatch.setattr(VAEConfig, "sd14", staticmethod(lambda: vae_config_from_diffusers(dict(sd["vae"].config))))
    monkeypatch.setattr(TextConfig, "openclip_vit_h14", staticmethod(lambda: _openclip_tiny_config(1)))
    read = []
    real_reader = CLIPTokenizer.from_openclip_bpe
    monkeypatch.setattr(CLIPTokenizer, "from_openclip_bpe",
                        staticmethod(lambda path, **kw: read.append(path) or real_reader(path, **kw)))

    common = ["convert", "videocrafter", "--ckpt", ckpt, "--version", 2, "--config", VC2 / "config.json"]
    out = tmp_path / "pipe"
    code, stdout, err = run_cli(common + ["--vocab", vocab, "--out", out], capsys)
    assert code == 0, err
    assert read == [str(vocab)]
    pipe = jaxlongvid.load(str(out))
    assert pipe.config.missing == ()
    assert_openclip_context(pipe, "VideoCrafter --vocab text context")

    missing = tmp_path / "nope" / pipelines.OPENCLIP_VOCAB
    code, _, err = run_cli(common + ["--vocab", missing, "--out", tmp_path / "pipe2"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert f"{missing}: no such vocabulary file" in err
    assert not (tmp_path / "pipe2").exists()


INFERENCE_YAML = """
model:
  target: lvdm.models.ddpm3d.LatentDiffusion
  params:
    scale_factor: 0.2
    unet_config:
      target: lvdm.modules.networks.openaimodel3d.UNetModel
      params: {unet}
    first_stage_config:
      target: lvdm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig: {{double_z: true, z_channels: 4, resolution: 256, in_channels: 3, out_ch: 3, ch: 128,
                   ch_mult: [1, 2, 4, 4], num_res_blocks: 2, attn_resolutions: [], dropout: 0.0}}
    cond_stage_config:
      target: lvdm.modules.encoders.condition.FrozenOpenCLIPEmbedder
      params: {{freeze: true, layer: {layer}}}
"""


def test_videocrafter_inference_yaml(tmp_path):
    """The inference YAML's UNet arguments, VAE ddconfig + scale_factor and text layer reach the configs."""
    kwargs = json.loads((VC2 / "config.json").read_text())["constructor_kwargs"]
    path = tmp_path / "inference_t2v_512_v2.0.yaml"
    path.write_text(INFERENCE_YAML.format(unet=json.dumps(kwargs), layer="penultimate"))
    settings = pipelines._ldm_settings(str(path))
    assert settings["vae"] == VAEConfig(scaling_factor=0.2)  # SD's KL-f8 architecture (the defaults)
    assert settings["text"] == TextConfig.openclip_vit_h14()
    assert pipelines._videocrafter_unet_config(str(path), 2) == videocrafter_config(kwargs, 2)
    path.write_text(INFERENCE_YAML.format(unet=json.dumps(kwargs), layer="pooled"))
    with pytest.raises(CheckpointError, match=r"inference_t2v_512_v2\.0\.yaml: cond_stage_config .*'pooled'"):
        pipelines._ldm_settings(str(path))


# ---- ModelScope ---------------------------------------------------------------------------------------------------
def test_modelscope_diffusers_folder(sd, tmp_path, capsys):
    """Every component lands where the direct converters put it (their parity with diffusers / transformers is
    tested in test_unet_parity.py and test_vae_text.py); scheduler and default size come from the folder."""
    torch.manual_seed(0)
    unet = randomise(UNet3DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D")))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)  # text-to-video-ms-1.7b's scheduler config
    folder = tmp_path / "t2v"
    TextToVideoSDPipeline(vae=sd["vae"], text_encoder=sd["text_encoder"], tokenizer=sd["tokenizer"], unet=unet,
                          scheduler=scheduler).save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):  # hub folders ship these; transformers 5 saves only tokenizer.json
        shutil.copy(sd["folder"] / "tokenizer" / name, folder / "tokenizer")
    out = tmp_path / "pipe"
    code, _, err = run_cli(["convert", "modelscope", "--diffusers", folder, "--out", out], capsys)
    assert code == 0, err
    pipe = jaxlongvid.load(str(out))
    c = pipe.config
    assert (c.family, c.missing, c.scheduler) == ("modelscope", (), SchedulerConfig.modelscope())
    assert (c.height, c.width, c.guidance_scale) == (16, 16, 9.0)  # sample_size 8 x VAE factor 2
    unet_config, unet_params = convert_modelscope_unet(unet.state_dict(), dict(unet.config))
    assert c.unet == unet_config
    assert_same_tree(pipe.params["unet"], unet_params)
    assert_same_tree(pipe.params["vae"], load_diffusers_vae(str(sd["folder"] / "vae"))[1])
    assert_same_tree(pipe.params["text"], load_hf_text_encoder(str(sd["folder"] / "text_encoder"))[1])
    want_ids = sd["tokenizer"]([PROMPT], padding="max_length", truncation=True, return_tensors="np").input_ids
    np.testing.assert_array_equal(pipe.tokenizer.encode([PROMPT]), want_ids)

    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {**json.loads((folder / "scheduler" / "scheduler_config.json").read_text()),
         "prediction_type": "v_prediction", "timestep_spacing": "trailing"}))  # honoured: ZeroScope-style finetunes
    assert pipelines.modelscope_pipeline(folder).config.scheduler == SchedulerConfig.modelscope().replace(
        prediction_type="v_prediction", timestep_spacing="trailing")


# ---- bad input ----------------------------------------------------------------------------------------------------
def _truncated(tmp: Path) -> Path:
    data = (LAVIE / "lavie_tiny.pt").read_bytes()
    (tmp / "cut.pt").write_bytes(data[: len(data) // 2])
    return tmp / "cut.pt"


def _unsafe(tmp: Path) -> Path:
    state = torch.load(LAVIE / "lavie_tiny.pt", weights_only=True)
    torch.save({"state_dict": state, "extra": NotAWeight()}, tmp / "evil.pt")
    return tmp / "evil.pt"


def _narrow_text_sd(tmp: Path, sd: dict) -> Path:
    """The SD folder with a 16-wide text encoder: the LaVie UNet cross-attends to 32 dims."""
    folder = tmp / "sd_narrow"
    shutil.copytree(sd["folder"], folder)
    shutil.rmtree(folder / "text_encoder")
    make_text_encoder(sd["tokenizer"], width=16).save_pretrained(folder / "text_encoder")
    return folder


def _text_as_pt(tmp: Path) -> Path:
    (tmp / "notes.pt").write_text("pop from an empty list: this is a text file renamed to .pt\n")
    return tmp / "notes.pt"


def _lavie_yaml(tmp: Path) -> Path:  # LaVie's own sampling config, which --config does not take
    (tmp / "sample.yaml").write_text("ckpt_path: lavie_base.pt\nsd_path: stable-diffusion-v1-4\nuse_fp16: true\n")
    return tmp / "sample.yaml"


BAD_INPUTS = {  # argv (without --out) with {tmp} / {sd}, and what the message must say
    "text renamed to .pt": (lambda tmp, sd: ["lavie", "--unet", _text_as_pt(tmp), "--config", LAVIE / "config.json"],
                            r"notes\.pt: not a PyTorch checkpoint \(text; torch\.save writes a zip archive"),
    "YAML config": (lambda tmp, sd: ["lavie", "--unet", LAVIE / "lavie_tiny.pt", "--config", _lavie_yaml(tmp)],
                    r"sample\.yaml: a YAML file; the LaVie UNet config must be a JSON file"),
    "config of another model": (lambda tmp, sd: ["lavie", "--unet", LAVIE / "lavie_tiny.pt", "--config",
                                                 VC1 / "config.json"],
                                r"videocrafter1/config\.json: LaVie UNet config: unknown constructor arguments"),
    "wrong family": (lambda tmp, sd: ["lavie", "--unet", VC2 / "model.ckpt", "--config", LAVIE / "config.json"],
                     r"model\.ckpt: not a LaVie UNet .*VideoCrafter2"),
    "truncated": (lambda tmp, sd: ["lavie", "--unet", _truncated(tmp), "--config", LAVIE / "config.json"],
                  r"cut\.pt: not a readable PyTorch checkpoint, truncated or corrupt"),
    "unsafe pickle": (lambda tmp, sd: ["lavie", "--unet", _unsafe(tmp), "--config", LAVIE / "config.json"],
                      r"evil\.pt: refused to load"),
    "wrong version": (lambda tmp, sd: ["videocrafter", "--ckpt", VC2 / "model.ckpt", "--version", "1", "--config",
                                       VC1 / "config.json"],
                      r"model\.ckpt: not a VideoCrafter1 UNet.*VideoCrafter2"),
    "not a t2v folder": (lambda tmp, sd: ["modelscope", "--diffusers", sd["folder"]], r"sd14\d*: no unet/ folder"),
    "mismatched components": (lambda tmp, sd: ["lavie", "--unet", LAVIE / "lavie_tiny.pt", "--config",
                                               LAVIE / "config.json", "--sd", _narrow_text_sd(tmp, sd)],
                              r"lavie_tiny\.pt, .*sd_narrow: .*text encoder's width 16 is not the UNet's "
                              r"cross-attention dim 32"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_1_and_writes_nothing(case, sd, tmp_path, capsys):
    make_argv, message = BAD_INPUTS[case]
    out = tmp_path / "out" / "pipe"
    argv = ["convert", *make_argv(tmp_path, sd), "--out", out]
    capsys.readouterr()  # drop what building the input printed
    code, stdout, err = run_cli(argv, capsys)
    assert code == 1 and stdout == ""
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line
    assert err.startswith("jaxlongvid convert: error: ") and re.search(message, err), err
    assert not out.parent.exists()  # not even the temporary sibling


def test_existing_output_is_kept(lavie_unet_only, capsys):
    before = sorted(p.name for p in lavie_unet_only.iterdir())
    code, _, err = run_cli(["convert", "lavie", "--unet", VC1 / "model.safetensors", "--out", lavie_unet_only],
                           capsys)
    assert code == 1 and "exists; pass --overwrite" in err and err.count("\n") == 1
    assert sorted(p.name for p in lavie_unet_only.iterdir()) == before

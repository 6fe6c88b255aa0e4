"""The tiny DiT's recipe (``jaxlongvid/tiny/train.py --model dit``): Wan's transformer in pixel space on the tiny text
encoder, trained with Wan's flow-matching objective, initialised as the original Wan code initialises it; a very
small DiT overfits a fixed batch, resumes exactly, exports a pipeline that ``jaxlongvid.sample`` runs with Wan's
flow sampler and long-video methods; ``tiny-dit`` names the bundled directory or says it is not shipped yet.

The weights themselves are not trained here (that takes a GPU, see the recipe's docstring)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlongvid
from jaxlongvid import cli, schedulers
from jaxlongvid import pipeline as pipeline_lib
from jaxlongvid.models.wan import EMBEDDER_STD, WanConfig, WanTransformer, original_init, rope_split
from jaxlongvid.tiny import train

PROMPT = "a red circle moving right on a black background"
SAMPLE = dict(num_inference_steps=2, progress=False)


def small(cfg: train.TinyConfig) -> train.Denoiser:
    """``cfg``'s DiT cut down to two blocks of two 12-wide heads (RoPE parts 4 / 4 / 4): seconds to compile."""
    model = cfg.model()
    return model._replace(config=dataclasses.replace(model.config, num_heads=2, head_dim=12, ffn_dim=32,
                                                     num_layers=2, freq_dim=16))


SMALL_CFG = train.TinyConfig(denoiser="dit", frames=8, size=16, batch=2, warmup_steps=0, learning_rate=3e-3)


def test_dit_recipe_is_wan_in_pixel_space_with_the_tiny_text_encoder():
    cfg = train.TinyConfig(denoiser="dit")
    model = cfg.model()
    c = model.config
    assert model.name == "tiny-dit" and isinstance(c, WanConfig)
    assert (c.in_channels, c.out_channels, c.text_dim) == (3, 3, cfg.text().width) == (3, 3, 64)
    assert (c.patch_size, c.head_dim, c.dim, c.native_frames) == ((1, 4, 4), 32, 192, cfg.frames)
    assert rope_split(c.head_dim) == (12, 10, 10)  # a frame component for the methods to map
    assert model.scheduler == schedulers.SchedulerConfig.wan()  # Wan's UniPC flow sampler
    assert model.scheduler.prediction_type == "flow"
    assert model.initialise is original_init
    unet = train.TinyConfig().model()
    assert (unet.name, unet.config, unet.scheduler.kind) == ("tiny", train.TinyConfig().unet(), "ddim")
    with pytest.raises(ValueError, match="TinyConfig.denoiser must be one of"):
        train.TinyConfig(denoiser="vit")
    shapes = jax.eval_shape(lambda: train.init_params(cfg, model, jax.random.key(0)))
    assert 4.5e6 < sum(x.size for x in jax.tree.leaves(shapes["unet"])) < 6e6  # about the UNet's size


def test_recipe_initialises_the_dit_as_the_original_wan_code():
    model = small(SMALL_CFG)
    params = train.init_params(SMALL_CFG, model, jax.random.key(0))["unet"]  # original_init, compiled with it
    module = WanTransformer(model.config)
    x, t, ctx = jnp.ones((1, 8, 16, 16, 3)), jnp.array([500.0]), jnp.ones((1, 16, 64))
    flax = jax.eval_shape(lambda: module.init(jax.random.key(0), x, t, ctx)["params"])
    assert jax.tree.structure(params) == jax.tree.structure(flax)
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, flax)
    np.testing.assert_array_equal(jax.jit(module.apply)({"params": params}, x, t, ctx), 0.0)  # zero projection
    dim = model.config.dim

    def check_uniform(w, bound):
        w = np.asarray(w)
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
        assert abs(w.std() - bound / np.sqrt(3)) < 0.1 * bound / np.sqrt(3)

    check_uniform(params["blocks_0"]["ffn"]["fc1"]["kernel"], np.sqrt(6 / (dim + 32)))
    check_uniform(params["blocks_1"]["attn2"]["to_k"]["kernel"], np.sqrt(6 / (dim + dim)))
    check_uniform(params["condition_embedder"]["time_proj"]["kernel"], np.sqrt(6 / (dim + 6 * dim)))
    check_uniform(params["patch_embedding"]["kernel"], np.sqrt(6 / (4 * 4 * 3 + dim)))  # fan-in over the patch
    bias = np.asarray(params["patch_embedding"]["bias"])
    assert np.abs(bias).max() <= 1 / np.sqrt(48) and bias.std() > 0
    for part in ("time_embedder", "text_embedder"):
        for layer in ("linear_1", "linear_2"):
            w = np.asarray(params["condition_embedder"][part][layer]["kernel"])
            assert abs(w.std() - EMBEDDER_STD) < 0.15 * EMBEDDER_STD
    table = np.concatenate([np.asarray(params[f"blocks_{i}"]["scale_shift_table"]).ravel() for i in (0, 1)])
    assert abs(table.std() - dim ** -0.5) < 0.15 * dim ** -0.5
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    names = {tuple(k.key for k in path): np.asarray(v) for path, v in flat}
    for path, value in names.items():
        layer = path[-2] if len(path) > 1 else ""
        if path[-1] == "bias" and layer != "patch_embedding" or layer == "proj_out":
            np.testing.assert_array_equal(value, 0.0, err_msg="/".join(path))
        if path[-1] == "scale":
            np.testing.assert_array_equal(value, 1.0, err_msg="/".join(path))
    with pytest.raises(ValueError, match="no rule for the parameter extra/table"):
        original_init({"extra": {"table": jnp.zeros(3)}}, jax.random.key(0))


def test_flow_target_is_what_the_flow_sampler_inverts():
    """Training noises a clip at ``sigma = t / T`` with the target ``noise - clean``; one step of Wan's UniPC
    sampler at that sigma reads the clean clip back (``x0 = x - sigma v``)."""
    config = train.TinyConfig(denoiser="dit").model().scheduler
    schedule = schedulers.make_schedule(config, 25)
    rng = np.random.default_rng(0)
    clean, noise = rng.uniform(-1, 1, (2, 4, 8, 8, 3)), rng.standard_normal((2, 4, 8, 8, 3))
    for i in (0, 7, 24):
        row = schedulers.row_at(schedule, i)
        signal, sigma = train.noise_levels(config, jnp.full((2,), config.num_train_timesteps * row.sigma))
        np.testing.assert_allclose(np.asarray(sigma), row.sigma, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(signal), 1 - row.sigma, rtol=1e-6)
        noisy = (1 - row.sigma) * clean + row.sigma * noise
        target = train.training_target("flow", clean, noise, signal, sigma)
        carry = schedulers.init_carry(schedule, noisy.astype(np.float32))
        x0 = schedulers.flow_step(row, carry, np.asarray(target, np.float32))[2]
        np.testing.assert_allclose(np.asarray(x0), clean, atol=2e-6)


def test_flow_timesteps_follow_the_sampler_shift():
    cfg = train.TinyConfig(denoiser="dit", high_noise_fraction=0.0)
    config = cfg.model().scheduler
    t = np.asarray(train.draw_timesteps(cfg, config, jax.random.key(0), 20000))
    assert t.dtype == np.float32 and 0 <= t.min() and t.max() < 1000
    # sigma = 3u / (1 + 2u) with u ~ U[0, 1): P(sigma >= 0.75) = P(u >= 0.5) = 1/2, P(sigma >= 0.9) = 1/4
    assert abs(np.mean(t >= 750) - 0.5) < 0.02 and abs(np.mean(t >= 900) - 0.25) < 0.02
    high = np.asarray(train.draw_timesteps(dataclasses.replace(cfg, high_noise_fraction=1.0), config,
                                           jax.random.key(0), 1000))
    assert high.min() >= 900 and high.max() < 1000
    ddpm = np.asarray(train.draw_timesteps(train.TinyConfig(high_noise_fraction=0.0),
                                           train.TinyConfig().model().scheduler, jax.random.key(0), 1000))
    assert ddpm.dtype == np.int32 and ddpm.min() >= 0 and ddpm.max() < 1000


def test_small_dit_overfits_a_fixed_batch():
    model = small(SMALL_CFG)
    params = train.init_params(SMALL_CFG, model, jax.random.key(0))
    state = train.initial_state(SMALL_CFG, params)
    videos, tokens = train.batch_for_step(SMALL_CFG, train.tokenizer(), 0)
    losses = []
    for _ in range(8):  # the same clips, timesteps and noise every step
        state, loss = train.train_step(SMALL_CFG, model, jnp.dtype("float32"), state, videos, tokens,
                                       jax.random.key(5))
        losses.append(float(loss))
    assert np.isfinite(losses).all() and int(state["step"]) == 8
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0], losses
    moved = lambda tree: max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(tree),
                                                                          jax.tree.leaves(params)))
    assert 0 < moved(state["ema"]) < moved(state["params"])  # the EMA trails the weights


def test_training_batches_cut_long_captions_without_a_warning_per_batch():
    """Two-object captions pass the text context (the last words are cut, as the shipped UNet was trained): the
    training batches stay quiet about it, while a user's prompt still gets the tokenizer's warning."""
    import warnings

    cfg = dataclasses.replace(SMALL_CFG, batch=48, caption_dropout=0.0)
    tok = train.tokenizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, tokens = train.batch_for_step(cfg, tok, 0)
    assert caught == [] and (tokens[:, -1] != tok.pad_id).any()  # some captions fill the whole context
    with pytest.warns(UserWarning, match="the model reads the first 14"):
        tok.encode(["a blue circle moving left and a red triangle moving right on a black background"])


def test_command_line_trains_each_denoiser_with_its_recipe():
    """``--model dit`` without options takes the DiT's recipe (batch 128, learning rate 3e-4, no high-noise share),
    ``--model unet`` TinyConfig's defaults; options given win."""
    config = lambda *argv: train.config_from_args(train.build_parser().parse_args(list(argv)))
    dit, unet = config("--model", "dit"), config("--model", "unet")
    assert (dit.batch, dit.learning_rate, dit.high_noise_fraction) == (128, 3e-4, 0.0)
    assert unet == train.TinyConfig()
    tuned = config("--model", "dit", "--learning-rate", "1e-4", "--batch", "64", "--high-noise-fraction", "0.05")
    assert (tuned.batch, tuned.learning_rate, tuned.high_noise_fraction) == (64, 1e-4, 0.05)


def test_attention_option_reaches_the_denoiser():
    """``--attention xla`` runs the DiT's self- and cross-attention through ``jax.nn.dot_product_attention`` (the
    default is the core's jnp path) with the same loss; ``cudnn`` reaches the kernels too: refused on this CPU."""
    args = train.build_parser().parse_args(["--model", "dit", "--attention", "cudnn"])
    assert train.config_from_args(args).attention == "cudnn"
    model = small(SMALL_CFG)
    params = train.init_params(SMALL_CFG, model, jax.random.key(0))
    head = params["unet"]["proj_out"]["kernel"]
    params["unet"]["proj_out"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(3), head.shape)  # not zero
    videos, tokens = train.batch_for_step(SMALL_CFG, train.tokenizer(), 0)

    def loss(attention):
        cfg = dataclasses.replace(SMALL_CFG, attention=attention)
        return float(jax.jit(lambda p: train.training_loss(cfg, model, jnp.dtype("float32"), p, videos, tokens,
                                                           jax.random.key(1)))(params))

    np.testing.assert_allclose(loss("xla"), loss(None), rtol=1e-5)
    with pytest.raises(RuntimeError, match="cuDNN"):
        loss("cudnn")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Through the recipe's command-line path (``train.run``) with the small DiT: 2 steps then ``--resume`` to 4
    in one workdir, 4 uninterrupted steps exported in another."""
    root = tmp_path_factory.mktemp("tiny_dit_runs")
    model = small(SMALL_CFG)

    def run(workdir, steps, *extra):
        args = train.build_parser().parse_args(["--model", "dit", "--workdir", str(root / workdir), "--max-steps",
                                                str(steps), "--workers", "0", "--log-every", "1", *extra])
        assert train.config_from_args(args).denoiser == "dit"
        return train.run(args, SMALL_CFG, model)

    assert run("split", 2) == {"steps": 2, "minutes": pytest.approx(0, abs=5)}
    assert run("split", 4, "--resume")["steps"] == 4
    assert run("whole", 4, "--export", str(root / "export"))["steps"] == 4
    return root, model


def test_small_dit_resumes_exactly(runs):
    root, model = runs
    template = train.initial_state(SMALL_CFG, train.init_params(SMALL_CFG, model, jax.random.key(0)))
    split = train.restore_state(train.checkpointer(root / "split"), template)
    whole = train.restore_state(train.checkpointer(root / "whole"), template)
    assert int(split["step"]) == int(whole["step"]) == 4
    for a, b in zip(jax.tree.leaves(split), jax.tree.leaves(whole)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(whole["params"]["unet"]["proj_out"]["kernel"]), 0.0)  # it trained
    logged = (root / "split" / "loss.csv").read_text().splitlines()
    assert logged[0] == "step,loss,seconds" and [int(line.split(",")[0]) for line in logged[1:]] == [1, 2, 3, 4]


def test_text_encoder_can_start_from_the_shipped_tiny_model(tmp_path):
    """``--text-from tiny``: the shipped UNet's trained text encoder (same tokenizer and width), the denoiser
    fresh; 0 steps, so the export holds the starting weights."""
    model = small(SMALL_CFG)
    args = train.build_parser().parse_args(["--model", "dit", "--workdir", str(tmp_path / "w"), "--max-steps", "0",
                                            "--workers", "0", "--text-from", "tiny", "--export",
                                            str(tmp_path / "export")])
    train.run(args, SMALL_CFG, model)
    got = jaxlongvid.load(str(tmp_path / "export")).params
    for a, b in zip(jax.tree.leaves(got["text"]), jax.tree.leaves(jaxlongvid.load("tiny").params["text"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fresh = train.init_params(SMALL_CFG, model, jax.random.key(SMALL_CFG.seed))["unet"]
    for a, b in zip(jax.tree.leaves(got["unet"]), jax.tree.leaves(fresh)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="--text-from applies when starting from fresh weights"):
        train.run(train.build_parser().parse_args(["--model", "dit", "--workdir", str(tmp_path / "v"), "--resume",
                                                   "--text-from", "tiny"]), SMALL_CFG, model)
    assert not (tmp_path / "v").exists()


@pytest.fixture(scope="module")
def exported(runs):
    root, model = runs
    return str(root / "export"), model


def test_export_loads_and_samples_long_videos_with_the_flow_sampler(exported):
    path, model = exported
    pipe = jaxlongvid.load(path)
    c = pipe.config
    assert (c.family, c.unet, c.vae, c.native_frames, c.height, c.width) == ("tiny-dit", model.config, None, 8, 16,
                                                                              16)
    assert c.scheduler == schedulers.SchedulerConfig.wan() and c.text == SMALL_CFG.text()
    assert json.loads(open(os.path.join(path, "pipeline.json")).read())["extra"]["train"]["steps"] == 4
    for frames, method in ((16, "longdiff"), (32, "freeloc")):  # 2x and 4x the native 8 frames
        video = jaxlongvid.sample(pipe, PROMPT, num_frames=frames, method=method, seed=0, **SAMPLE)
        assert video.dtype == np.uint8 and video.shape == (frames, 16, 16, 3)
        np.testing.assert_array_equal(video, jaxlongvid.sample(pipe, PROMPT, num_frames=frames, method=method,
                                                               seed=0, **SAMPLE))
    other = jaxlongvid.sample(pipe, PROMPT, num_frames=32, method="freeloc", seed=1, **SAMPLE)
    assert not np.array_equal(other, video)


def test_training_continues_on_a_new_machine_from_an_export(exported, tmp_path):
    """How the DiT's training spans device sessions: ``--resume --init EXPORT`` in an empty workdir starts from
    the exported EMA weights (text encoder included) at the export's step count, with fresh optimizer moments."""
    path, model = exported
    args = train.build_parser().parse_args(["--model", "dit", "--workdir", str(tmp_path / "w"), "--max-steps", "5",
                                            "--workers", "0", "--resume", "--init", path, "--log-every", "1"])
    assert train.run(args, SMALL_CFG, model)["steps"] == 5  # one step after the export's 4
    template = train.initial_state(SMALL_CFG, train.init_params(SMALL_CFG, model, jax.random.key(0)))
    state = train.restore_state(train.checkpointer(tmp_path / "w"), template)
    start = jaxlongvid.load(path).params
    logged = (tmp_path / "w" / "loss.csv").read_text().splitlines()
    assert int(state["step"]) == 5 and [line.split(",")[0] for line in logged[1:]] == ["5"]
    assert jax.tree.structure(state["params"]) == jax.tree.structure(start)
    moved = [not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(start))]
    assert all(moved)  # one AdamW step moves every leaf
    # the EMA after one step is 0.999 of the export's weights plus 0.001 of the new ones
    for ema, new, old in zip(jax.tree.leaves(state["ema"]), jax.tree.leaves(state["params"]),
                             jax.tree.leaves(start)):
        np.testing.assert_allclose(np.asarray(ema), SMALL_CFG.ema_decay * np.asarray(old)
                                   + (1 - SMALL_CFG.ema_decay) * np.asarray(new), rtol=1e-5, atol=1e-7)


def test_tiny_dit_names_the_bundled_directory_or_says_it_is_not_shipped(exported, tmp_path, monkeypatch, capsys):
    path, _ = exported
    bundled = tmp_path / "tiny_dit" / "weights"
    _, message = pipeline_lib.BUNDLED["tiny-dit"]
    monkeypatch.setitem(pipeline_lib.BUNDLED, "tiny-dit", (str(bundled), message))
    with pytest.raises(FileNotFoundError) as e:
        jaxlongvid.load("tiny-dit")
    text = str(e.value)
    assert "\n" not in text and "tiny DiT is not shipped yet" in text and str(bundled) in text
    assert "python -m jaxlongvid.tiny.train --model dit --export DIR" in text
    out = str(tmp_path / "x.gif")
    assert cli.main(["sample", "--model", "tiny-dit", "--prompt", PROMPT, "--out", out]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tiny DiT is not shipped yet" in err and not os.path.exists(out)
    assert cli.main(["info"]) == 0
    assert "bundled tiny-dit model: not installed" in capsys.readouterr().out

    pipeline_lib.save(jaxlongvid.load(path), str(bundled))
    assert pipeline_lib.resolve("tiny-dit") == str(bundled)
    assert jaxlongvid.load("tiny-dit").config.family == "tiny-dit"
    assert cli.main(["sample", "--model", "tiny-dit", "--prompt", PROMPT, "--frames", "16", "--steps", "1",
                     "--no-progress", "--out", out]) == 0
    assert os.path.isfile(out)
    assert cli.main(["info"]) == 0
    assert "bundled tiny-dit model: yes" in capsys.readouterr().out


def test_package_data_ships_the_tiny_dit_directory():
    import tomllib

    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]["jaxlongvid"]
    assert "tiny_dit/weights/**/*" in globs
    assert os.path.relpath(pipeline_lib.TINY_DIT_DIR, os.path.dirname(jaxlongvid.__file__)) == \
        os.path.join("tiny_dit", "weights")


def test_the_dit_run_in_progress_loads_with_this_code():
    """``jaxlongvid/tiny_dit/checkpoint`` is the tiny DiT's training so far, continued on each device session with
    ``--resume --init``: it must keep loading as the code changes, and it is not the bundled model."""
    path = os.path.join(os.path.dirname(jaxlongvid.__file__), "tiny_dit", "checkpoint")
    pipe = jaxlongvid.load(path)
    assert pipe.config.extra["train"]["steps"] > 0 and pipe.config.scheduler.prediction_type == "flow"
    latents = jax.random.normal(jax.random.key(0), (1, 4, 32, 32, 3))
    out = pipe.denoiser(latents, jnp.array([500.0]), pipe.encode_prompts(["a red circle bouncing"]))
    assert out.shape == latents.shape and bool(jnp.isfinite(out).all())
    with pytest.raises(FileNotFoundError, match="not shipped yet"):
        jaxlongvid.load("tiny-dit")

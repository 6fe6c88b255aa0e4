"""The bundled tiny model: its weights load with the training recipe's architecture, their digest is the one the
model card quotes, a short sample runs, the evaluation judges clean renders as passing, and training resumes
from the shipped weights."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxlongvid
from jaxlongvid.bench import runner
from jaxlongvid.models.unet3d import UNet3D
from jaxlongvid.tiny import data, evaluate, train

CARD = os.path.join(os.path.dirname(evaluate.__file__), "MODEL_CARD.md")
SHORT = dict(num_frames=8, num_inference_steps=3, seed=0, progress=False)


@pytest.fixture(scope="module")
def pipe():
    return jaxlongvid.load("tiny")


def test_bundled_weights_load_with_the_recipe_architecture(pipe):
    cfg = train.TinyConfig()
    expected = jax.eval_shape(lambda: train.init_params(cfg, cfg.model(), jax.random.key(0)))
    shipped = {"unet": pipe.params["unet"], "text": pipe.params["text"]}
    shapes = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), shipped)
    assert shapes == jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), expected)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(shipped))
    c = pipe.config
    assert (c.family, c.vae, c.native_frames, c.height, c.width) == ("tiny", None, 16, 32, 32)
    assert c.unet == cfg.unet() and c.text == cfg.text()
    assert c.scheduler.kind == "ddim" and c.scheduler.clip_sample
    assert pipe.tokenizer.encode(["a red circle moving right"]).tolist() == \
        train.tokenizer().encode(["a red circle moving right"]).tolist()


def _card_digest() -> str:
    with open(CARD) as f:
        found = re.findall(r"SHA-256[^`\n]*`([0-9a-f]{64})`", f.read())
    assert len(found) == 1, f"MODEL_CARD.md should quote exactly one SHA-256 digest, found {found}"
    return found[0]


def test_weights_digest_matches_model_card():
    assert evaluate.weights_digest(evaluate.PARAMS_DIR) == _card_digest()


def test_weights_digest_sees_contents_names_and_files(tmp_path):
    tree = tmp_path / "w"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.bin").write_bytes(b"abc")
    (tree / "sub" / "b.bin").write_bytes(b"def")
    base = evaluate.weights_digest(str(tree))
    assert evaluate.weights_digest(str(tree)) == base and re.fullmatch(r"[0-9a-f]{64}", base)
    (tree / "a.bin").write_bytes(b"abd")
    changed = evaluate.weights_digest(str(tree))
    (tree / "a.bin").write_bytes(b"abc")
    (tree / "sub" / "b.bin").rename(tree / "sub" / "c.bin")
    renamed = evaluate.weights_digest(str(tree))
    (tree / "extra").write_bytes(b"")
    added = evaluate.weights_digest(str(tree))
    assert len({base, changed, renamed, added}) == 4
    with pytest.raises(FileNotFoundError, match="not a directory"):
        evaluate.weights_digest(str(tmp_path / "missing"))


def test_short_sample_gives_uint8_frames(pipe):
    prompts = runner.prompts(2)
    video = jaxlongvid.sample(pipe, prompts, **SHORT)
    assert video.dtype == np.uint8 and video.shape == (2, 8, 32, 32, 3)
    assert video.std() > 5.0  # an image, not a constant
    np.testing.assert_array_equal(video, jaxlongvid.sample(pipe, prompts, **SHORT))  # same seed, same clips


def test_evaluate_command_writes_its_outputs(pipe, tmp_path, capsys):
    """On a saved copy of the tiny pipeline: the outputs, and the digest of the weights evaluated (the shipped
    weights' digest is the card's, tested above)."""
    model, out = tmp_path / "model", tmp_path / "eval"
    jaxlongvid.pipeline.save(pipe, str(model))
    assert evaluate.main(["--model", str(model), "--prompts", "2", "--frames", "8", "--steps", "3", "--batch", "2",
                          "--long-frames", "0", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 1 and len(results[0]["rows"]) == 2
    assert [r["prompt"] for r in results[0]["rows"]] == runner.prompts(2)
    assert results[0]["settings"]["guidance"] == pipe.config.guidance_scale
    assert "issue 5" in (out / "report.md").read_text()
    import imageio.v3 as iio

    sheet = iio.imread(out / "samples.png")
    assert sheet.shape == (2 * 2 * 32 + 2, 8 * 2 * 32 + 7 * 2, 3)  # 2 rows x 8 frames at scale 2, 2-px gaps
    assert "weights digest: " + evaluate.weights_digest(str(model / "params")) in capsys.readouterr().out


def test_judge_passes_clean_renders_and_fails_wrong_ones():
    prompts = runner.prompts(12, seed=3)
    clips = np.stack([data.render(data.scene_from_prompt(p, np.random.default_rng(i)), 16, 32)
                      for i, p in enumerate(prompts)])
    summary = evaluate.summarise(evaluate.judge(clips, prompts))
    assert summary["overall"]["all"] == 1.0 and summary["criterion_met"]
    shuffled = evaluate.summarise(evaluate.judge(clips, prompts[1:] + prompts[:1]))  # each clip, another prompt
    assert shuffled["overall"]["all"] < 0.5 and not shuffled["criterion_met"]
    assert set(summary["by"]) == {"colour", "shape", "motion", "background"}
    assert sum(r["n"] for r in summary["by"]["motion"].values()) == 12
    with pytest.raises(ValueError, match="single-object"):
        evaluate.judge(clips[:1], ["a red circle moving left and a blue square moving right"])


def test_training_resumes_from_shipped_weights(pipe, tmp_path):
    # one training step at batch 2 on CPU; compiling the step dominates, so it compiles with most XLA
    # optimisations off, as the in-process tests do (tests/conftest.py)
    steps = int(pipe.config.extra["train"]["steps"])
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    env.pop("XLA_FLAGS", None)  # one host device is enough
    cmd = [sys.executable, "-m", "jaxlongvid.tiny.train", "--resume", "--max-steps", str(steps + 1), "--batch", "2",
           "--workers", "1", "--log-every", "1", "--workdir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from the tiny weights (step {steps}" in done.stdout
    assert json.loads(done.stdout.strip().splitlines()[-1])["steps"] == steps + 1
    loss = float(re.search(rf"step {steps + 1}  loss ([0-9.]+)", done.stdout).group(1))
    assert 0.0 < loss < 0.5  # a trained model's (<= 0.25 even at t = 0), not a fresh one's (about 1)
    assert os.path.isdir(tmp_path / "checkpoints" / str(steps + 1))
    shutil.rmtree(tmp_path / "checkpoints")


def test_bench_shapes_is_registered_in_the_cli(monkeypatch):
    from jaxlongvid import cli

    seen = []
    monkeypatch.setattr(runner, "run_from_args", lambda args: seen.append(args) or 0)
    assert cli.main(["bench", "shapes", "--frames", "32", "--methods", "direct,longdiff", "--prompts", "2",
                     "--seeds", "1", "--steps", "4", "--out", "somewhere"]) == 0
    (args,) = seen
    assert (args.frames, args.methods, args.prompts, args.seeds, args.steps, args.out, args.model) == (
        "32", "direct,longdiff", 2, 1, 4, "somewhere", "tiny")
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "shapes"])  # no --out
    assert e.value.code == 2


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_training_target_is_what_the_sampler_inverts(prediction):
    """The recipe's regression target, read back by the sampler's ``predict``, gives the clean clip and the noise."""
    from jaxlongvid import schedulers

    config = train.TinyConfig().model().scheduler.replace(prediction_type=prediction, clip_sample=False)
    row = schedulers.row_at(schedulers.make_schedule(config, 25), 3)
    rng = np.random.default_rng(0)
    clean, noise = rng.uniform(-1, 1, (2, 4, 8, 8, 3)), rng.standard_normal((2, 4, 8, 8, 3))
    signal, sigma = train.noise_levels(config, np.full((2,), row.timestep))
    np.testing.assert_allclose(np.asarray(signal), row.sqrt_alpha, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sigma), row.sqrt_one_minus_alpha, rtol=1e-6)
    signal, sigma = (np.asarray(x)[:, None, None, None, None] for x in (signal, sigma))
    noisy = signal * clean + sigma * noise
    target = train.training_target(prediction, clean, noise, signal, sigma)
    x0, eps = schedulers.predict(config, row, noisy.astype(np.float32), np.asarray(target, np.float32))
    np.testing.assert_allclose(np.asarray(x0), clean, atol=2e-5)
    np.testing.assert_allclose(np.asarray(eps), noise, atol=2e-5)
    assert train.TinyConfig().model().scheduler.prediction_type == "v_prediction"


def test_grow_params_adds_identity_temporal_convs():
    # weights trained without temporal conv blocks, placed into the architecture with them, compute the same
    cfg = train.TinyConfig(frames=4, size=16, temporal_conv=True)
    grown_cfg = cfg.unet()
    plain_cfg = train.TinyConfig(frames=4, size=16, temporal_conv=False).unet()
    assert grown_cfg.temporal_conv and not plain_cfg.temporal_conv
    x = jax.random.normal(jax.random.key(1), (2, 4, 16, 16, 3))
    ctx = jax.random.normal(jax.random.key(2), (2, train.CONTEXT_LENGTH, 64))
    t = np.array([10, 900])
    plain = UNet3D(plain_cfg).init(jax.random.key(3), x, t, ctx)["params"]
    fresh = UNet3D(grown_cfg).init(jax.random.key(4), x, t, ctx)["params"]
    grown, new_leaves = train.grow_params(fresh, plain)
    assert new_leaves == len(jax.tree.leaves(fresh)) - len(jax.tree.leaves(plain)) > 0
    assert "temp_conv" in str(jax.tree_util.tree_structure(grown))
    want = UNet3D(plain_cfg).apply({"params": plain}, x, t, ctx)
    got = UNet3D(grown_cfg).apply({"params": grown}, x, t, ctx)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="unknown leaves"):
        train.grow_params(plain, grown)  # the larger tree does not fit the smaller


def test_widen_word_pairs_moves_only_the_named_pairs():
    from jaxlongvid.models import text as text_model

    cfg = train.TinyConfig()
    params = text_model.init_params(cfg.text(), jax.random.key(0))
    tok = train.tokenizer()
    widened = train.widen_word_pairs(params, tok, train.OPPOSITE_DIRECTIONS, 8.0)
    before = np.asarray(params["token_embedding"]["embedding"])
    after = np.asarray(widened["token_embedding"]["embedding"])
    moved = set()
    for a, b in train.OPPOSITE_DIRECTIONS:
        ia, ib = tok.ids[a], tok.ids[b]
        moved |= {ia, ib}
        old = before[ia] - before[ib]
        np.testing.assert_allclose(after[ia] - after[ib], old + 8.0 * old / np.linalg.norm(old), atol=1e-5)
        np.testing.assert_allclose(after[ia] + after[ib], before[ia] + before[ib], atol=1e-6)  # same midpoint
    others = [i for i in range(len(before)) if i not in moved]
    np.testing.assert_array_equal(after[others], before[others])
    rest = lambda p: {k: v for k, v in p.items() if k != "token_embedding"}
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((np.asarray(x) == np.asarray(y)).all()),
                                     rest(widened), rest(params)))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        train.widen_word_pairs(params, tok, (("right", "sideways"),), 1.0)

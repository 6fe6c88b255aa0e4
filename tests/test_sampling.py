"""The sampling loop end to end with a tiny stand-in denoiser (pixel space) and the real tiny text encoder.

The stand-in (``StandIn``) is a real Flax denoiser in the shape of the UNets: per-frame convs, a time and a text
embedding, two :class:`jaxlongvid.attention.TemporalAttention` layers with LaVie's encoding (RoPE + T5 bias,
native 8 frames), normalisations pooled over all frames (as LaVie's ResNet norms) and the ``P(data, frames)``
constraints. ``test_sharding.py`` and ``test_cli.py`` import it from here.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlongvid.pipeline as pipeline_lib
from jaxlongvid import noise, sampling, schedulers, sharding
from jaxlongvid.attention import Encoding, TemporalAttention
from jaxlongvid.methods import FreeNoiseShuffle, GroupShift, MethodPlan, TimePlan, as_plan, get_method
from jaxlongvid.models import text as text_lib
from jaxlongvid.models.tokenizers import WordTokenizer
from jaxlongvid.models.unet3d import UNet3DConfig, init_shapes
from jaxlongvid.pipeline import Pipeline, PipelineConfig
from jaxlongvid.schedulers import SchedulerConfig

PROMPTS = ["a red circle moving left", "a blue square bouncing", "a green triangle circling"]


# ---- the stand-in denoiser ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StandInConfig:
    in_channels: int = 3
    channels: int = 16
    rope_dim: int = 8
    native_frames: int = 8
    cross_attention_dim: int = 32
    groups: int = 4
    downsample_factor: int = 1  # only for the pipeline's size check: the stand-in does not downsample

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StandInConfig":
        return cls(**d)


def pooled_group_norm(x, groups: int, scale, bias, eps: float = 1e-5):
    """GroupNorm whose statistics pool every frame of a video (LaVie's ResNet norms): a cross-shard reduction."""
    b, f, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(b, f, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 3, 5), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 2, 3, 5), keepdims=True)
    return ((g - mean) / jnp.sqrt(var + eps)).reshape(x.shape) * scale + bias


class StandIn(nn.Module):
    config: StandInConfig
    method: object = "direct"
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, timesteps, context, fps=None):
        cfg = self.config
        c = cfg.channels
        plan = as_plan(self.method).resolve(("temporal_0", "temporal_1"))
        video = lambda v: sharding.constrain(v, sharding.VIDEO)
        h = nn.Conv(c, (3, 3), name="conv_in")(x)
        half = c // 2
        freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(half) / half)
        ang = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs
        temb = nn.Dense(c, name="time")(jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], -1))
        cemb = nn.Dense(c, name="text")(context.mean(axis=1))
        h = video(h + (temb + cemb)[:, None, None, None, :])
        encoding = Encoding(rope_dim=cfg.rope_dim, t5_buckets=32, native_frames=cfg.native_frames)
        for i in range(2):
            name = f"temporal_{i}"
            scale = self.param(f"norm_{i}_scale", nn.initializers.ones, (c,))
            bias = self.param(f"norm_{i}_bias", nn.initializers.zeros, (c,))
            normed = pooled_group_norm(h, cfg.groups, scale, bias)
            attn = TemporalAttention(1, c, encoding, plan.for_layer(name), name=name)
            h = video(h + attn(normed, features=h))
        out = nn.Conv(cfg.in_channels, (3, 3), name="conv_out")(nn.silu(pooled_group_norm(h, cfg.groups, 1.0, 0.0)))
        return video(x + 0.3 * out)  # near-identity eps prediction keeps the chain bounded


pipeline_lib.register_model(StandInConfig, StandIn)


def random_params(module, *args, seed: int = 0, std: float = 0.3):
    """Random weights from the parameter shapes (``eval_shape``: nothing is compiled)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: (std * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def make_pipeline(unet=None, vae=None, scheduler=None, seed: int = 0, **settings) -> Pipeline:
    """A random pixel-space (or latent, with ``vae``) pipeline on the stand-in and the tiny text encoder."""
    from jaxlongvid.models import vae as vae_lib

    unet = unet or StandInConfig()
    tokenizer = WordTokenizer.from_texts(PROMPTS + ["ugly blurry"], context_length=8)
    text = dataclasses.replace(text_lib.TextConfig.tiny(tokenizer.vocab_size, 8), width=unet.cross_attention_dim,
                               num_heads=2, mlp_dim=64, num_layers=1)
    config = PipelineConfig(family="standin", unet=unet, text=text, vae=vae,
                            scheduler=scheduler or SchedulerConfig.lavie(),
                            **{**dict(num_frames=8, num_inference_steps=3, height=8, width=8), **settings})
    module = pipeline_lib.build_denoiser(config)
    f = config.latent_factor
    x = jnp.zeros((1, 2, max(1, 8 // f), max(1, 8 // f), unet.in_channels))
    params = {"unet": random_params(module, x, jnp.zeros((1,), jnp.int32), jnp.zeros((1, 8, unet.cross_attention_dim)),
                                    seed=seed),
              "text": random_params(text_lib.TextEncoder(text), jnp.zeros((1, 8), jnp.int32), seed=seed + 1,
                                    std=0.1)}
    if vae is not None:
        params["vae"] = random_params(vae_lib.AutoencoderKL(vae), jnp.zeros((1, 8, 8, 3)), seed=seed + 2, std=0.1)
    return Pipeline(config, params, tokenizer)


def tiny_unet_pipeline() -> Pipeline:
    """A random LaVie-style UNet3D in pixel space (RoPE 32 + T5 bias, 2 levels, native 8 frames)."""
    tokenizer = WordTokenizer.from_texts(PROMPTS, context_length=8)
    text = dataclasses.replace(text_lib.TextConfig.tiny(tokenizer.vocab_size, 8), width=16, num_heads=2,
                               mlp_dim=32, num_layers=1)
    unet = UNet3DConfig.lavie().replace(in_channels=3, out_channels=3, block_channels=(32, 32),
                                        attention_levels=(True, False), attention_heads=(1, 1),
                                        cross_attention_dim=16, layers_per_block=1, norm_groups=8, native_frames=8)
    config = PipelineConfig(family="lavie-tiny", unet=unet, text=text, scheduler=SchedulerConfig.lavie(),
                            num_frames=8, num_inference_steps=2, height=8, width=8, extra={"note": "test"})
    rng = np.random.default_rng(0)
    unet_params = jax.tree_util.tree_map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32),
                                         init_shapes(unet))
    text_params = random_params(text_lib.TextEncoder(text), jnp.zeros((1, 8), jnp.int32), seed=1, std=0.1)
    return Pipeline(config, {"unet": unet_params, "text": text_params}, tokenizer)


@pytest.fixture(scope="module")
def pipe():
    return make_pipeline()


# ---- a plain Python reference of the loop ----------------------------------------------------------------------
jit_denoiser = jax.jit(pipeline_lib.apply_denoiser, static_argnums=(0, 1))


def reference_sample(pipe: Pipeline, prompts, negatives, num_frames, steps, guidance, seed, method="direct",
                     eta=None):
    """Eager, step by step: text encoder, initial noise, ``pipe.denoiser`` on (uncond, cond) separately,
    guidance and the scheduler step written out from schedulers.Schedule; returns float frames in [-1, 1]."""
    config = pipe.config
    method = as_plan(method)
    cond = pipe.encode_prompts(prompts)
    uncond = pipe.encode_prompts(negatives)
    noise_key, loop_key = jax.random.split(jax.random.key(seed))
    shape = (len(prompts), num_frames, 8, 8, 3)
    if isinstance(method.noise, FreeNoiseShuffle):
        x = noise.freenoise(noise_key, shape, window=method.noise.window, stride=method.noise.stride, axis=1)
    else:
        x = jax.random.normal(noise_key, shape)
    sched = schedulers.make_schedule(config.scheduler, steps, eta)
    prev_x0 = jnp.zeros(shape)
    for i in range(sched.num_steps):
        row = schedulers.row_at(sched, i)
        t = jnp.full((len(prompts),), int(row.timestep), jnp.int32)
        e_c = jit_denoiser(config, method, pipe.params["unet"], x, t, cond)
        e_u = jit_denoiser(config, method, pipe.params["unet"], x, t, uncond)
        e = e_u + guidance * (e_c - e_u) if guidance > 1 else e_c
        z = jax.random.normal(jax.random.fold_in(loop_key, i), shape) if sched.stochastic else None
        x, prev_x0 = schedulers.step(config.scheduler, row, x, e, prev_x0, z)
    return np.asarray(x)


# ---- tests ----------------------------------------------------------------------------------------------------------
# Most tests share one compiled loop: two prompts, 24 frames, 3 steps (the fixture's defaults).
KW = dict(num_frames=24, progress=False)


@pytest.mark.parametrize("method,guidance,eta", [("direct", 7.5, None), ("longdiff", 4.0, None),
                                                 ("freenoise", 1.0, 1.0)])
def test_loop_matches_eager_reference(pipe, method, guidance, eta):
    """The compiled scan (batched guidance pair, scheduler rows, noise) equals the step-by-step eager loop."""
    got = sampling.sample(pipe, PROMPTS[:2], method=method, seed=3, guidance_scale=guidance,
                          negative_prompt="ugly blurry", eta=eta, output="float", **KW)
    want = reference_sample(pipe, PROMPTS[:2], ["ugly blurry"] * 2, 24, 3, guidance, 3, method, eta)
    err = np.max(np.abs(got - want))
    assert err < 1e-4, err
    assert np.max(np.abs(want)) > 0.1  # not a trivially small signal


@pytest.mark.parametrize("kind", ["dpmsolver++", "ddpm"])
def test_other_schedulers_in_the_loop(kind):
    """DPM-Solver++ carries the previous x0 through the scan (4 steps: first order, 2 x second, first order);
    DDPM adds noise and uses the current sample."""
    scheduler = SchedulerConfig.lavie(kind=kind)
    pipe = make_pipeline(scheduler=scheduler, num_frames=16, num_inference_steps=4)
    assert np.any(schedulers.make_schedule(scheduler, 4).history != 0) == (kind == "dpmsolver++")
    got = sampling.sample(pipe, PROMPTS[:1], seed=2, num_frames=16, output="float", progress=False)
    want = reference_sample(pipe, PROMPTS[:1], [""], 16, 4, 7.5, 2)
    err = np.max(np.abs(got - want))
    assert err < 1e-4, err


def test_output_shapes_dtype_and_uint8_rounding(pipe):
    batch = sampling.sample(pipe, PROMPTS[:2], **KW)
    assert batch.shape == (2, 24, 8, 8, 3) and batch.dtype == np.uint8
    one = sampling.sample(pipe, PROMPTS[0], **KW)
    assert one.shape == (24, 8, 8, 3) and one.dtype == np.uint8
    np.testing.assert_array_equal(batch[0], one)  # the first prompt of a batch gets the single prompt's noise
    assert np.mean(batch[0] != batch[1]) > 0.5
    floats = sampling.sample(pipe, PROMPTS[0], output="float", **KW)
    expected = np.clip((floats / 2.0 + 0.5) * 255.0 + 0.5, 0, 255).astype(np.uint8)  # LaVie's conversion
    assert np.mean(one == expected) > 0.999  # float rounding at .5 boundaries aside
    assert np.max(np.abs(one.astype(int) - expected.astype(int))) <= 1
    assert 0 < np.mean(one == 0) + np.mean(one == 255) < 0.9  # in range, not saturated


def test_determinism_and_seeds(pipe):
    kw = dict(method="freenoise", guidance_scale=1.0, eta=1.0, **KW)
    a = sampling.sample(pipe, PROMPTS[:2], seed=5, **kw)
    b = sampling.sample(pipe, PROMPTS[:2], seed=5, **kw)
    c = sampling.sample(pipe, PROMPTS[:2], seed=6, **kw)
    np.testing.assert_array_equal(a, b)
    assert np.mean(a != c) > 0.5


def test_methods_and_prompts_change_the_video(pipe):
    kw = dict(seed=1, output="float", **KW)
    direct = sampling.sample(pipe, PROMPTS[:2], method="direct", **kw)
    assert np.max(np.abs(sampling.sample(pipe, PROMPTS[:2], method="longdiff", **kw) - direct)) > 1e-3
    plan = MethodPlan(default=get_method("direct"), layers=((1, get_method("freeloc")),))
    assert np.max(np.abs(sampling.sample(pipe, PROMPTS[:2], method=plan, **kw) - direct)) > 1e-3
    other = sampling.sample(pipe, [PROMPTS[0], PROMPTS[2]], method="direct", **kw)
    np.testing.assert_allclose(other[0], direct[0], atol=1e-6)  # videos of a batch do not mix
    assert np.max(np.abs(other[1] - direct[1])) > 1e-3  # same noise, other prompt
    neg = sampling.sample(pipe, PROMPTS[:2], method="direct", negative_prompt="ugly blurry", **kw)
    assert np.max(np.abs(neg - direct)) > 1e-3
    # without guidance the negative prompt is not used
    unguided = dict(kw, method="freenoise", guidance_scale=1.0, eta=1.0)
    np.testing.assert_array_equal(sampling.sample(pipe, PROMPTS[:2], **unguided),
                                  sampling.sample(pipe, PROMPTS[:2], negative_prompt="ugly blurry", **unguided))


def test_progress_bar_runs_the_same_loop(pipe, capsys):
    kw = dict(method="longdiff", seed=4, guidance_scale=4.0, negative_prompt="ugly blurry", output="float",
              num_frames=24)
    quiet = sampling.sample(pipe, PROMPTS[:2], progress=False, **kw)
    shown = sampling.sample(pipe, PROMPTS[:2], progress=True, **kw)
    np.testing.assert_allclose(shown, quiet, atol=1e-6)
    err = capsys.readouterr().err
    assert "denoising" in err and "3/3" in err


def test_initial_noise_follows_the_method():
    key = jax.random.key(0)
    shape = (1, 24, 2, 2, 3)
    fn = np.asarray(sampling.initial_noise(key, shape, "freelong"))
    np.testing.assert_array_equal(fn, np.asarray(noise.freenoise(key, shape, 16, 4, axis=1)))
    assert sorted(fn[0, 16:20, 0, 0, 0].tolist()) == sorted(fn[0, 0:4, 0, 0, 0].tolist())  # a shuffled copy
    g = np.asarray(sampling.initial_noise(key, shape, "longdiff"))
    np.testing.assert_array_equal(g, np.asarray(jax.random.normal(key, shape)))
    plan = MethodPlan(default=get_method("freenoise"))
    np.testing.assert_array_equal(np.asarray(sampling.initial_noise(key, shape, plan)), fn)


def test_latent_pipeline_decodes_with_the_vae():
    from jaxlongvid.models import vae as vae_lib

    vae_config = vae_lib.VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                                   latent_channels=4)
    pipe = make_pipeline(unet=StandInConfig(in_channels=4), vae=vae_config)
    assert pipe.config.spatial_factor == 2
    latents = sampling.sample(pipe, PROMPTS[0], num_frames=8, height=16, width=16, progress=False,
                              output="latents")
    assert latents.shape == (8, 8, 8, 4)
    video = sampling.sample(pipe, PROMPTS[0], num_frames=8, height=16, width=16, progress=False, output="float",
                            decode_chunk=3)
    assert video.shape == (8, 16, 16, 3)
    want = vae_lib.decode(pipe.params["vae"], vae_config, jnp.asarray(latents), chunk=0)
    np.testing.assert_allclose(video, np.asarray(want), atol=1e-5)


# ---- matmul precision ------------------------------------------------------------------------------------------
def hlo_precisions(text: str) -> set[str]:
    """The precisions of every dot_general and convolution in StableHLO text."""
    dots = re.findall(r"stablehlo\.dot_general .*precision = \[(\w+), (\w+)\]", text)
    convs = re.findall(r"stablehlo\.convolution.*precision_config = \[#stablehlo<precision (\w+)>, "
                       r"#stablehlo<precision (\w+)>\]", text)
    assert dots and (convs or "stablehlo.convolution" not in text), "no matmul found in the program"
    assert len(convs) == text.count("stablehlo.convolution"), "a convolution without a precision config"
    return {p for pair in dots + convs for p in pair}


@pytest.fixture
def lowered(monkeypatch):
    """Spy on the compiled denoising loop and decoder: each call also records the StableHLO text it lowers to,
    lowered in the caller's context (the precision ``sample`` sets) exactly as the call traces it."""
    texts = {"denoise": [], "decoder": []}
    real_denoise, real_decoder = sampling.denoise, sampling._decoder

    def denoise(*args, **kwargs):
        texts["denoise"].append(real_denoise.lower(*args, **kwargs).as_text())
        return real_denoise(*args, **kwargs)

    def decoder(*args):
        fn = real_decoder(*args)

        def run(*a):
            texts["decoder"].append(fn.lower(*a).as_text())
            return fn(*a)

        return run

    monkeypatch.setattr(sampling, "denoise", denoise)
    monkeypatch.setattr(sampling, "_decoder", decoder)
    return texts


def test_precision_reaches_the_compiled_loop_and_is_exact_f32_on_cpu(pipe, lowered):
    """Each precision is in every dot of the compiled loop, whatever the global setting (the tests set
    "highest"; under JAX's default, "default", a float32 pipeline still gets "highest"); a bfloat16 pipeline
    keeps the surrounding setting. On CPU every precision multiplies in float32, so the videos are identical."""
    kw = dict(seed=2, output="float", **KW)
    videos = {}
    for precision in sampling.PRECISIONS:
        videos[precision] = sampling.sample(pipe, PROMPTS[:2], precision=precision, **kw)
        assert hlo_precisions(lowered["denoise"][-1]) == {precision.upper()}
    with jax.default_matmul_precision("default"):  # JAX's own default, as on a GPU without configuration
        videos[None] = sampling.sample(pipe, PROMPTS[:2], **kw)
        assert hlo_precisions(lowered["denoise"][-1]) == {"HIGHEST"}
        bf16 = make_pipeline(dtype="bfloat16")
        sampling.sample(bf16, PROMPTS[:2], num_frames=8, progress=False)
        assert hlo_precisions(lowered["denoise"][-1]) == {"DEFAULT"}
    assert sampling.resolve_precision(None, bf16.config) is None
    for precision, video in videos.items():
        np.testing.assert_array_equal(video, videos["highest"], err_msg=str(precision))


def test_precision_keys_the_jit_cache(pipe):
    """A precision change compiles a new program instead of reusing one traced at another precision; the same
    precision again reuses it (frames 40: a shape no other test compiles)."""
    kw = dict(seed=0, num_frames=40, progress=False)
    before = sampling.denoise._cache_size()
    sampling.sample(pipe, PROMPTS[0], precision="high", **kw)
    assert sampling.denoise._cache_size() == before + 1
    sampling.sample(pipe, PROMPTS[0], precision="highest", **kw)
    assert sampling.denoise._cache_size() == before + 2
    sampling.sample(pipe, PROMPTS[0], precision="high", **kw)
    sampling.sample(pipe, PROMPTS[0], **kw)  # None = "highest" for this float32 pipeline
    assert sampling.denoise._cache_size() == before + 2


def test_precision_reaches_the_vae_decoder(lowered):
    from jaxlongvid.models import vae as vae_lib

    vae_config = vae_lib.VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                                   latent_channels=4)
    pipe = make_pipeline(unet=StandInConfig(in_channels=4), vae=vae_config)
    for precision in ("default", "highest"):
        sampling.sample(pipe, PROMPTS[0], num_frames=8, height=16, width=16, progress=False, precision=precision)
        assert hlo_precisions(lowered["decoder"][-1]) == {precision.upper()}


# ---- bad input: clear errors before anything is traced ---------------------------------------------------------
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(num_frames=0), ValueError, "num_frames must be >= 1"),
    (dict(num_frames=2.5), TypeError, "num_frames must be an int"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
    (dict(height=12, width=8), None, None),  # fine for the stand-in (factor 1)
    (dict(method="longdif"), ValueError, "unknown method 'longdif'"),
    (dict(prompt=[]), ValueError, "empty list"),
    (dict(prompt=["ok", 3]), TypeError, "every prompt must be a string"),
    (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), ValueError, "3 negative prompts for 2"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(fps=8), ValueError, "no fps conditioning"),
    (dict(output="png"), ValueError, "output must be"),
    (dict(eta=-0.5), ValueError, "eta must be >= 0"),
    (dict(precision="fast"), ValueError, "precision must be None, 'default', 'high' or 'highest', got 'fast'"),
    (dict(precision="HIGHEST"), ValueError, "precision must be"),
    (dict(precision=3), ValueError, "precision must be"),
])
def test_bad_requests(pipe, no_tracing, kwargs, error, match):
    kwargs = {"prompt": PROMPTS[0], **kwargs}
    prompt = kwargs.pop("prompt")
    if error is None:
        with pytest.raises(AssertionError, match="reached the compiled loop"):
            sampling.sample(pipe, prompt, progress=False, **kwargs)
        return
    with pytest.raises(error, match=match):
        sampling.sample(pipe, prompt, progress=False, **kwargs)


def test_size_must_fit_the_model(no_tracing):
    pipe = make_pipeline(unet=StandInConfig(downsample_factor=4))
    with pytest.raises(ValueError, match=r"multiples of 4"):
        sampling.sample(pipe, PROMPTS[0], height=8, width=10, progress=False)
    with pytest.raises(ValueError, match="eta applies to DDIM"):
        dpm = make_pipeline(scheduler=SchedulerConfig.modelscope(kind="dpmsolver++"))
        sampling.sample(dpm, PROMPTS[0], eta=1.0, progress=False)


# ---- the pipeline object and its files ------------------------------------------------------------------------
def test_denoiser_contract(pipe):
    ctx = pipe.encode_prompts(PROMPTS[:2])
    assert ctx.shape == (2, 8, 32)
    x = jax.random.normal(jax.random.key(0), (2, 24, 8, 8, 3))
    t = jnp.array([10, 500], jnp.int32)
    direct = pipe.denoiser(x, t, ctx)  # eager, as users call it
    assert direct.shape == x.shape
    np.testing.assert_allclose(np.asarray(direct), np.asarray(
        jit_denoiser(pipe.config, get_method("direct"), pipe.params["unet"], x, t, ctx)), atol=1e-5)
    longdiff = jit_denoiser(pipe.config, get_method("longdiff"), pipe.params["unet"], x, t, ctx)
    assert np.max(np.abs(np.asarray(longdiff) - np.asarray(direct))) > 1e-4


def test_save_load_round_trip(pipe, tmp_path):
    target = tmp_path / "model"
    pipeline_lib.save(pipe, target)
    assert sorted(p.name for p in target.iterdir()) == ["params", "pipeline.json", "tokenizer"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    loaded = pipeline_lib.load(str(target))
    assert loaded.config == pipe.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.params, pipe.params)
    np.testing.assert_array_equal(loaded.tokenizer.encode(PROMPTS), pipe.tokenizer.encode(PROMPTS))
    a = sampling.sample(pipe, PROMPTS[0], num_frames=8, progress=False)
    np.testing.assert_array_equal(sampling.sample(loaded, PROMPTS[0], num_frames=8, progress=False), a)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pipeline_lib.save(pipe, target)
    other = make_pipeline(seed=7)
    pipeline_lib.save(other, target, overwrite=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, pipeline_lib.load(str(target)).params, other.params)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_failed_save_leaves_nothing(pipe, tmp_path, monkeypatch):
    class Broken:
        def save(self, folder):
            raise OSError("disk full")

    broken = Pipeline(pipe.config, pipe.params, Broken())
    with pytest.raises(OSError, match="disk full"):
        pipeline_lib.save(broken, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such pipeline directory"):
        pipeline_lib.load(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no pipeline.json"):
        pipeline_lib.load(str(tmp_path))
    monkeypatch.setitem(pipeline_lib.BUNDLED, "tiny", (str(tmp_path / "tiny_weights"), pipeline_lib.BUNDLED["tiny"][1]))
    with pytest.raises(FileNotFoundError, match="bundled tiny model"):
        pipeline_lib.load("tiny")
    (tmp_path / "pipeline.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a jaxlongvid pipeline config"):
        pipeline_lib.load(str(tmp_path))


def test_config_json_round_trip_and_registry(pipe):
    config = pipe.config
    assert PipelineConfig.from_dict(config.to_dict()) == config
    tagged = config.replace(extra={"train": {"steps": 3}})
    assert tagged == config and hash(tagged) == hash(config)  # metadata: no recompilation
    assert PipelineConfig.from_dict(json.loads(json.dumps(tagged.to_dict()))).extra == {"train": {"steps": 3}}
    with pytest.raises(ValueError, match=r"unknown pipeline config fields \['heigth'\]"):
        PipelineConfig.from_dict({**config.to_dict(), "heigth": 8})
    d = config.to_dict()
    d["unet"]["class"] = "NoSuchConfig"
    with pytest.raises(ValueError, match="unknown model config class 'NoSuchConfig'"):
        PipelineConfig.from_dict(d)
    from jaxlongvid.models.unet3d import UNet3D

    assert pipeline_lib.module_class(UNet3DConfig.lavie()) is UNet3D
    with pytest.raises(ValueError, match="pixel-space pipeline"):
        PipelineConfig(family="x", unet=UNet3DConfig.lavie(), text=config.text)


# ---- methods scheduled over denoising time (issue 17) --------------------------------------------------------------
def test_time_plan_phases_resolve_once_to_step_ranges():
    a, b = get_method("longdiff"), get_method("freenoise")
    plan = TimePlan("ab", ((0.25, a), (1.0, b)))
    assert sampling.resolve_phases(plan, 25) == ((0, 6, a), (6, 25, b))  # round(6.25) = 6
    assert sampling.resolve_phases(plan, 3) == ((0, 1, a), (1, 3, b))
    assert sampling.resolve_phases(plan, 1) == ((0, 1, b),)  # a phase left with no step is dropped
    assert sampling.resolve_phases("direct", 7) == ((0, 7, get_method("direct")),)
    assert sampling.resolve_phases("keepmotion", 25)[0][2].positions == GroupShift()
    for phases, match in (((), "empty"), (((0.5, a),), "end at 1"), (((0.6, a), (0.4, b), (1.0, a)), "increase"),
                          (((1.0, "longdiff"),), "Method or MethodPlan")):
        with pytest.raises(ValueError, match=match):
            TimePlan("bad", phases)


def test_one_phase_time_plan_is_the_plain_method_exactly(pipe):
    kw = dict(seed=2, guidance_scale=4.0, output="float", **KW)
    plain = sampling.sample(pipe, PROMPTS[:2], method="longdiff", **kw)
    one = sampling.sample(pipe, PROMPTS[:2], method=TimePlan("one", ((1.0, get_method("longdiff")),)), **kw)
    np.testing.assert_array_equal(one, plain)


def reference_phased_sample(pipe, prompts, num_frames, guidance, seed, methods):
    """The eager loop of ``reference_sample`` with the method of each step given by hand (``methods[i]``),
    from the initial noise of ``methods[0]``."""
    config = pipe.config
    cond, uncond = pipe.encode_prompts(prompts), pipe.encode_prompts([""] * len(prompts))
    noise_key, loop_key = jax.random.split(jax.random.key(seed))
    shape = (len(prompts), num_frames, 8, 8, 3)
    x = sampling.initial_noise(noise_key, shape, methods[0])
    sched = schedulers.make_schedule(config.scheduler, len(methods))
    prev_x0 = jnp.zeros(shape)
    for i, method in enumerate(methods):
        row = schedulers.row_at(sched, i)
        t = jnp.full((len(prompts),), int(row.timestep), jnp.int32)
        e_c = jit_denoiser(config, method, pipe.params["unet"], x, t, cond)
        e_u = jit_denoiser(config, method, pipe.params["unet"], x, t, uncond)
        x, prev_x0 = schedulers.step(config.scheduler, row, x, e_u + guidance * (e_c - e_u), prev_x0, None)
    return np.asarray(x)


def test_two_phase_time_plan_equals_the_loops_run_by_hand(pipe):
    """LongDiff (with FreeNoise's initial noise) for step 0, FreeNoise for steps 1-2: the per-phase scans, the
    per-step progress loop and an eager loop switching methods by hand agree."""
    first = get_method("longdiff").replace(noise=FreeNoiseShuffle())
    plan = TimePlan("ld-fn", ((0.34, first), (1.0, get_method("freenoise"))))
    kw = dict(seed=5, guidance_scale=4.0, output="float", num_frames=24)
    got = sampling.sample(pipe, PROMPTS[:2], method=plan, progress=False, **kw)
    want = reference_phased_sample(pipe, PROMPTS[:2], 24, 4.0, 5, [first, get_method("freenoise"),
                                                                 get_method("freenoise")])
    assert np.max(np.abs(got - want)) < 1e-4 and np.max(np.abs(want)) > 0.1
    np.testing.assert_allclose(sampling.sample(pipe, PROMPTS[:2], method=plan, progress=True, **kw), got, atol=1e-6)


def test_auto_method_follows_the_native_length(pipe):
    native = pipe.config.native_frames
    assert sampling.auto_method(pipe.config, native) == get_method("direct")
    assert sampling.auto_method(pipe.config, native + 1) == get_method(sampling.AUTO_LONG)
    assert sampling.check_request(pipe, "a red circle", num_frames=24, method="auto").method == \
        get_method(sampling.AUTO_LONG)
    kw = dict(seed=1, output="float", **KW)
    np.testing.assert_array_equal(sampling.sample(pipe, PROMPTS[:2], method="auto", **kw),
                                  sampling.sample(pipe, PROMPTS[:2], method=sampling.AUTO_LONG, **kw))
    with pytest.raises(ValueError, match="resolved by the sampler"):
        get_method("auto")


@pytest.mark.parametrize("kind", ["unipc-flow", "euler-flow"])
def test_flow_schedulers_in_the_loop(kind):
    """Flow matching (Wan's samplers) through the same compiled loop: the 4-entry UniPC state (sample, corrected
    sample, two previous x0s) carried through the scan, float timesteps reaching the model; equals the eager
    loop written with schedulers.flow_step."""
    scheduler = SchedulerConfig.wan(kind)
    pipe = make_pipeline(scheduler=scheduler, num_frames=16, num_inference_steps=4)
    got = sampling.sample(pipe, PROMPTS[:1], seed=2, num_frames=16, output="latents", progress=False)
    config, method = pipe.config, get_method("direct")
    cond, uncond = pipe.encode_prompts(PROMPTS[:1]), pipe.encode_prompts([""])
    noise_key, _ = jax.random.split(jax.random.key(2))
    x = jax.random.normal(noise_key, (1, 16, 8, 8, 3))
    sched = schedulers.make_schedule(scheduler, 4)
    carry = schedulers.init_carry(sched, x)
    for i in range(sched.num_steps):
        row = schedulers.row_at(sched, i)
        t = jnp.full((1,), row.timestep, jnp.float32)
        v_c = jit_denoiser(config, method, pipe.params["unet"], carry[0], t, cond)
        v_u = jit_denoiser(config, method, pipe.params["unet"], carry[0], t, uncond)
        carry = schedulers.flow_step(row, carry, v_u + 7.5 * (v_c - v_u))
    want = np.asarray(carry[0])
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err < 1e-5, err

"""Training recipe of the bundled tiny text-to-video models: the UNet (``tiny``) and the DiT (``tiny-dit``).

    python -m jaxlongvid.tiny.train [--model unet|dit] --workdir runs/tiny --max-minutes 9 [--resume] [--export DIR]

Pixel-space diffusion of 16-frame 32x32 clips from :mod:`jaxlongvid.tiny.data` with a small CLIP-style text
encoder over the caption vocabulary, trained jointly with the denoiser from scratch. The denoiser
(``TinyConfig.denoiser``, ``--model``) is either

* ``unet``: a LaVie-style 3D UNet (RoPE + T5-bias temporal attention, plus temporal conv blocks), v-prediction on
  the cosine noise schedule, sampled with DDIM (the shipped ``tiny``, ``MODEL_CARD.md``); or
* ``dit``: a DiT of Wan2.1's architecture (:class:`jaxlongvid.models.wan.WanTransformer`: 3D RoPE, AdaLN
  modulation, cross-attention to the text, RMS-normed q / k), trained with Wan's flow-matching objective
  (velocity ``noise - clean`` at ``x = (1 - sigma) clean + sigma noise``) and sampled with Wan's UniPC flow
  sampler (``tiny-dit``, not shipped yet).

Both go through one code path: the denoiser's config, sampler and initial weights are decided once
(:meth:`TinyConfig.model`), the network is built from the pipeline registry, and the noisy input and the
regression target follow from the sampler's prediction type (:func:`noise_levels`, :func:`training_target`). optax
AdamW with warm-up and gradient clipping, an EMA of the weights, classifier-free-guidance caption dropout. An
orbax checkpoint of the whole training state is written every ``--save-minutes`` and when ``--max-minutes`` runs
out, so one run spans several short device commands: each resumes from the latest checkpoint in ``--workdir``.
Batches are drawn from a seed per step, so a resumed run sees the same data as an uninterrupted one.

``--resume`` without a checkpoint in the workdir starts from the weights shipped in the package, or from the
pipeline directory ``--init`` (EMA weights; the optimizer moments are not shipped, so they restart at zero).

Training the tiny DiT (not done yet; the tiny UNet needed about 70k steps at batch 64 to reach issue 5's 90%).
Its run so far is kept in the repository, ``jaxlongvid/tiny_dit/checkpoint`` (the EMA weights as a pipeline
directory, the step count in its ``pipeline.json``; not part of the installed package), so each device session
continues it: the working tree travels to the device, ``runs/`` stays on a warm machine between commands::

    python -m jaxlongvid.tiny.train --model dit --attention cudnn --max-minutes 8.5 \
        --resume --init jaxlongvid/tiny_dit/checkpoint --workdir runs/tiny-dit --export runs/tiny-dit-export \
        && cp runs/tiny-dit/loss.csv $OUT/ && tar cf - -C runs tiny-dit-export | gzip -1 | split -b 4m - $OUT/export.

``--model dit`` trains with the DiT's recipe (batch 128, learning rate 3e-4, no high-noise share:
``COMMAND_LINE_RECIPES``). The device returns neither the orbax folder's nested directories nor one 19 MB file,
hence the 4 MB pieces: ``cat export.* | tar xzf -`` here, then the export replaces
``jaxlongvid/tiny_dit/checkpoint``. ``--resume --init`` starts from the EMA weights with fresh optimizer moments and
the step count kept; later commands on the same warm machine resume from ``runs/tiny-dit`` itself. ``--text-from
tiny`` (a fresh start only) takes the shipped UNet's text encoder, which already tells the prompts' colours, shapes
and motions apart. No high-noise share is needed: Wan's shift 3 already puts a quarter of the steps at sigma >= 0.9.
Evaluation with the tiny model's prompt criterion (``jaxlongvid/tiny/evaluate.py``)::

    python -m jaxlongvid.tiny.evaluate --model runs/tiny-dit-export --prompts 50 --frames 16 --batch 50 \
        --long-frames 0 --sheet-rows 0 --out $OUT/eval_dit [--guidance-sweep 1,2,4]

Measured so far:

* One H100, 2026-12-06 (``docs/tiny_dit_training_loss.csv``): from scratch, batch 64, learning rate 3e-4, jnp
  attention: 8,234 steps in 7.64 minutes (about 18 steps/s after compilation); loss 1.38 (step 100), 0.155 (1k),
  0.082 (4k), 0.066 (8k). On a CPU (50 prompts, prompt seed 0, 16 frames, guidance 1): colour in 98% of frames,
  shape in 22%, prompted motion in 18% of clips, criterion 0%. Not kept.
* One H200, 2026-12-07 (``docs/tiny_dit_training_loss_2.csv``; the kept checkpoint): ``--text-from tiny``, batch
  128, cuDNN attention, but the UNet's defaults for the rest (learning rate 1e-4, a high-noise share of 0.05):
  5,130 steps in 7.0 minutes, the first 4 of them sharing the GPU with a ShapesBench run, then 3,619 more in 4.5
  minutes alone (18.2 steps/s at batch 128 after compilation; another card and kernel than the run above); loss
  1.42 (step 100), 0.106 (5k), 0.090 (8.7k). At step 8,749 on a CPU, the same evaluation: colour in 93% of frames,
  shape in 20%, every clip's motion read as bouncing, criterion 0%. One-step denoising of 8 rendered clips shows
  where it stands: at sigma 0.1-0.5 its clean-clip estimate is within 0.0015-0.011 MSE (pixels in [-1, 1]; a mean
  image scores 0.355), but at sigma 0.9 its estimate of the frame-to-frame change is no better than none (MSE
  0.0249 against the clips' 0.0235): layout and motion, which are decided at high noise, are not learnt yet
  (``benchmarks/one_step_denoising.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlongvid.models import text as text_model
from jaxlongvid.models import wan
from jaxlongvid.models.tokenizers import WordTokenizer
from jaxlongvid.models.unet3d import UNet3DConfig
from jaxlongvid.pipeline import load, module_class
from jaxlongvid.schedulers import SchedulerConfig, alphas_cumprod, shift_sigmas
from jaxlongvid.tiny import data as tiny_data
from jaxlongvid.tiny.vocab import WORDS

CONTEXT_LENGTH = 16
DENOISERS = ("unet", "dit")
# What a command line trains with unless told otherwise, per denoiser: the UNet's continues the shipped run
# (TinyConfig's defaults); the DiT's is its first run's: on the UNet's defaults (learning rate 1e-4, a high-noise
# share) the run in progress (jaxlongvid/tiny_dit/checkpoint) stood at a higher loss near step 8k (0.090 against
# 0.066; other differences too: batch, text encoder; the module doc).
COMMAND_LINE_RECIPES = {"unet": {}, "dit": {"learning_rate": 3e-4, "high_noise_fraction": 0.0, "batch": 128}}


class Denoiser(NamedTuple):
    """The network a recipe trains, decided once from ``TinyConfig.denoiser`` (:meth:`TinyConfig.model`)."""

    name: str  # the bundled pipeline it ships as (``jaxlongvid.load(name)``) and the exported family
    config: Any  # a registered denoiser config: UNet3DConfig or WanConfig
    scheduler: SchedulerConfig  # the sampler it is trained for (its prediction type is the training target)
    initialise: Callable[[dict, Any], dict]  # (Flax-initialised weights, key) -> the weights training starts from


def flax_init(params: dict, key) -> dict:
    """The module's own Flax initialisation, unchanged (the UNet's)."""
    return params


@dataclass(frozen=True)
class TinyConfig:
    """Everything that defines the tiny model and its training run."""

    denoiser: str = "unet"  # "unet": the shipped tiny model; "dit": the DiT of Wan's architecture (tiny-dit)
    size: int = 32  # pixels per side
    frames: int = 16  # training clip length = the model's native frame count
    batch: int = 32
    # The defaults continue the shipped run as its last phase trained it (MODEL_CARD.md, "Training"); the
    # phases before took 3e-4 and a high_noise_fraction of 0 to 0.5 (the pipeline.json history).
    learning_rate: float = 1e-4
    warmup_steps: int = 500
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1  # empty caption, for classifier-free guidance
    seed: int = 0
    # What made the model follow the prompted direction of linear motion (MODEL_CARD.md, "Direction of linear
    # motion"): zero-padded temporal convs tell a frame where it sits in the clip, and extra training where
    # the direction is decided (t >= 900) gives it a signal.
    temporal_conv: bool = True  # zero-padded temporal conv blocks after every ResNet (VideoCrafter2 style)
    high_noise_fraction: float = 0.05  # share of each batch whose timestep is drawn from [high_noise_from, T)
    high_noise_from: int = 900
    # the denoiser's attention_implementation in training (None: the module's default; "cudnn": fused attention
    # on NVIDIA GPUs in bfloat16, which the DiT's default plain jnp attention is not)
    attention: Optional[str] = None

    def __post_init__(self):
        if self.denoiser not in DENOISERS:
            raise ValueError(f"TinyConfig.denoiser must be one of {DENOISERS}, got {self.denoiser!r}")

    def model(self) -> Denoiser:
        """The chosen denoiser's name, architecture, sampler and initialisation."""
        if self.denoiser == "unet":
            return Denoiser("tiny", self.unet(), self.unet_scheduler(), flax_init)
        return Denoiser("tiny-dit", self.dit(), self.dit_scheduler(), wan.original_init)

    def unet(self) -> UNet3DConfig:
        return UNet3DConfig(family="tiny", in_channels=3, out_channels=3, block_channels=(32, 64, 128),
                            layers_per_block=1, attention_levels=(False, True, True), attention_heads=(1, 2, 4),
                            cross_attention_dim=64, norm_groups=16, temporal_conv=self.temporal_conv,
                            native_frames=self.frames)

    def dit(self) -> wan.WanConfig:
        """Wan2.1's DiT at the UNet's size: 6 heads of 32 (dim 192; RoPE channels 12 / 10 / 10 for frames, rows and
        columns), 8 blocks, FFN 768, Wan's 256-wide timestep sinusoid, the tiny text encoder's width.

        Patches of (1, 4, 4) pixels: an 8x8 grid of 64 tokens a frame, 1,024 tokens for the 16-frame clip. A training
        clip then costs 47 GFLOPs forward and backward (XLA's count on the CPU), against the UNet's 67; with
        (1, 2, 2) patches the 4,096 tokens make full 3D attention 16x dearer and a step about 4x the UNet's (261
        GFLOPs at dim 128), and at 8x the native length (128 frames) attention would span 32,768 tokens. Objects are
        9-13 pixels across, 2-3 tokens, and the output projection draws each 4x4 patch whole."""
        return wan.WanConfig(patch_size=(1, 4, 4), num_heads=6, head_dim=32, in_channels=3, out_channels=3,
                             text_dim=self.text().width, freq_dim=256, ffn_dim=768, num_layers=8,
                             native_frames=self.frames)

    def text(self) -> text_model.TextConfig:
        return text_model.TextConfig.tiny(vocab_size=len(WordTokenizer.SPECIALS) + len(WORDS),
                                          context_length=CONTEXT_LENGTH)

    def unet_scheduler(self) -> SchedulerConfig:
        # Cosine betas reach a signal-to-noise ratio of ~0 at t = T. LaVie's linear schedule keeps
        # sqrt(alpha_bar) ~ 0.009 there, and in pixel space the clip's mean colour stays readable through
        # that much noise, so an epsilon model learns to take background and motion from the leak instead of
        # the caption and samples from pure noise come out grey-tinted. At zero SNR epsilon is undefined at
        # t = T, hence v-prediction; trailing spacing starts sampling at t = T. x0 is clipped to [-1, 1].
        return SchedulerConfig(kind="ddim", beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                               timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=True,
                               clip_sample=True)

    def dit_scheduler(self) -> SchedulerConfig:
        # Wan's own sampler (UniPC on flow sigmas, shift 3 as at 480p), so jaxlongvid.sample runs on the tiny DiT
        # exactly what it runs on Wan2.1. Training draws its sigmas with the same shift (draw_timesteps), which
        # spends half of the steps at sigma >= 0.75, where layout and motion are decided (MODEL_CARD.md).
        return SchedulerConfig.wan()


def tokenizer() -> WordTokenizer:
    return WordTokenizer(list(WORDS), context_length=CONTEXT_LENGTH)


@functools.partial(jax.jit, static_argnums=(0, 1))
def init_params(cfg: TinyConfig, model: Denoiser, key) -> dict:
    """Fresh weights ``{"unet": denoiser, "text": text encoder}`` (``"unet"`` names the denoiser, as in a
    pipeline, whichever it is) for clips of ``cfg``; one compiled program (op by op, a model's initialisation
    dispatches hundreds of small ones)."""
    k_unet, k_text = jax.random.split(key)
    denoiser = module_class(model.config)(model.config)
    x = jnp.zeros((1, cfg.frames, cfg.size, cfg.size, 3))
    ctx = jnp.zeros((1, CONTEXT_LENGTH, cfg.text().width))
    params = denoiser.init(k_unet, x, jnp.zeros((1,), jnp.int32), ctx)["params"]
    return {"unet": model.initialise(params, k_unet), "text": text_model.init_params(cfg.text(), k_text)}


def grow_params(fresh: dict, trained: dict) -> tuple[dict, int]:
    """``trained`` weights placed into the larger tree ``fresh`` of a grown architecture: every trained leaf
    must exist in ``fresh`` with the same shape; leaves only ``fresh`` has keep their initial values (new
    temporal conv blocks start as the identity). Returns the tree and the number of new leaves."""
    from flax import traverse_util

    new, old = traverse_util.flatten_dict(fresh, sep="/"), traverse_util.flatten_dict(trained, sep="/")
    unknown = sorted(set(old) - set(new))
    mismatched = sorted(k for k in set(old) & set(new) if np.shape(old[k]) != np.shape(new[k]))
    if unknown or mismatched:
        raise ValueError(f"trained weights do not fit the architecture: {len(unknown)} unknown leaves "
                         f"{unknown[:3]}, {len(mismatched)} with other shapes {mismatched[:3]}")
    merged = {k: old.get(k, v) for k, v in new.items()}
    return traverse_util.unflatten_dict(merged, sep="/"), len(new) - len(old)


OPPOSITE_DIRECTIONS = (("right", "left"), ("down", "up"))


def widen_word_pairs(text_params: dict, tok: WordTokenizer, pairs, by: float) -> dict:
    """Text weights with the token embeddings of each word pair moved apart by ``by`` along their difference
    (each word by half), everything else unchanged.

    The direction words sit at a symmetric saddle: a denoiser that ignores the sign of a motion gives the
    text encoder no reason to tell "left" from "right", and a text encoder whose outputs for them differ by
    0.3 (against 4.8 for "right" and "up") gives the denoiser nothing to use. Widening the pair once breaks
    the tie; training then keeps what is useful.
    """
    table = np.array(text_params["token_embedding"]["embedding"], dtype=np.float32)
    for a, b in pairs:
        if a not in tok.ids or b not in tok.ids:
            raise ValueError(f"widen_word_pairs: {a!r} or {b!r} is not in the vocabulary")
        ia, ib = tok.ids[a], tok.ids[b]
        unit = (table[ia] - table[ib]) / np.linalg.norm(table[ia] - table[ib])
        table[ia] += 0.5 * by * unit
        table[ib] -= 0.5 * by * unit
    embedding = {**text_params["token_embedding"], "embedding": jnp.asarray(table)}
    return {**text_params, "token_embedding": embedding}


def make_optimizer(cfg: TinyConfig):
    # optax's warm-up over 0 steps would keep its start value, 0, for ever: no warm-up is the constant rate
    lr = optax.warmup_constant_schedule(0.0, cfg.learning_rate, cfg.warmup_steps) if cfg.warmup_steps else \
        cfg.learning_rate
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(lr, weight_decay=cfg.weight_decay))


def draw_timesteps(cfg: TinyConfig, scheduler: SchedulerConfig, key, batch: int) -> jnp.ndarray:
    """The model timesteps ``[batch]`` of one training batch.

    Diffusion (DDIM, DDPM, DPM-Solver++ samplers): integers uniform over ``[0, T)``. Flow matching (Wan's
    samplers): ``T sigma`` (float) with ``sigma = shift(u)``, ``u ~ U[0, 1)`` and the sampler's ``flow_shift``,
    so training sees the noise levels in the proportions the sampler visits them. Either way a share
    ``cfg.high_noise_fraction`` of the batch is drawn uniformly from ``[cfg.high_noise_from, T)`` instead.
    """
    t_max = scheduler.num_train_timesteps
    k_high, k_pick = jax.random.split(jax.random.fold_in(key, 1))
    if scheduler.prediction_type == "flow":
        t = t_max * shift_sigmas(jax.random.uniform(key, (batch,)), scheduler.flow_shift)
        high = jax.random.uniform(k_high, (batch,), minval=cfg.high_noise_from, maxval=t_max)
    else:
        t = jax.random.randint(key, (batch,), 0, t_max)
        high = jax.random.randint(k_high, (batch,), cfg.high_noise_from, t_max)
    if cfg.high_noise_fraction > 0:
        t = jnp.where(jax.random.uniform(k_pick, (batch,)) < cfg.high_noise_fraction, high, t)
    return t


def noise_levels(scheduler: SchedulerConfig, t) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``(signal, sigma)`` ``[B]`` at model timesteps ``t``: the noisy clip is ``signal clean + sigma noise``.
    Flow matching: ``sigma = t / T``, ``signal = 1 - sigma``; diffusion: ``sqrt(abar[t])``, ``sqrt(1 - abar[t])``."""
    if scheduler.prediction_type == "flow":
        sigma = jnp.asarray(t, jnp.float32) / scheduler.num_train_timesteps
        return 1.0 - sigma, sigma
    abar = jnp.asarray(alphas_cumprod(scheduler))[t]
    return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def training_target(prediction_type: str, clean, noise, signal, sigma):
    """What the network learns to output for ``noisy = signal clean + sigma noise`` (:func:`noise_levels`; the
    sampler's ``schedulers.predict`` / ``flow_step`` invert it)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return signal * noise - sigma * clean
    if prediction_type == "sample":
        return clean
    if prediction_type == "flow":  # Wan: the velocity d noisy / d sigma
        return noise - clean
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def training_loss(cfg: TinyConfig, model: Denoiser, dtype, params, videos, tokens, key) -> jnp.ndarray:
    """Mean squared error of the denoiser's output against its target (:func:`training_target`) on the clips
    ``videos`` noised at timesteps drawn from ``key``, with the captions ``tokens`` encoded by the text encoder
    being trained; matrix products in ``dtype``."""
    scheduler = model.scheduler
    k_t, k_noise = jax.random.split(key)
    t = draw_timesteps(cfg, scheduler, k_t, videos.shape[0])
    noise = jax.random.normal(k_noise, videos.shape)
    signal, sigma = (x[:, None, None, None, None] for x in noise_levels(scheduler, t))
    noisy = signal * videos + sigma * noise
    context = text_model.TextEncoder(cfg.text(), dtype).apply({"params": params["text"]}, tokens)
    kernels = {} if cfg.attention is None else {"attention_implementation": cfg.attention}
    denoiser = module_class(model.config)(model.config, dtype=dtype, **kernels)
    pred = denoiser.apply({"params": params["unet"]}, noisy, t, context.astype(jnp.float32))
    target = training_target(scheduler.prediction_type, videos, noise, signal, sigma)
    return jnp.mean((pred.astype(jnp.float32) - target) ** 2)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def train_step(cfg: TinyConfig, model: Denoiser, dtype, state: dict, videos, tokens, key) -> tuple[dict, jnp.ndarray]:
    """One AdamW step (:func:`make_optimizer`) of the training state ``{"params", "ema", "opt_state", "step"}``
    and its EMA update; returns the new state and the loss. Compiled once per (config, denoiser, dtype, shapes)."""
    loss, grads = jax.value_and_grad(functools.partial(training_loss, cfg, model, dtype))(
        state["params"], videos, tokens, key)
    updates, opt_state = make_optimizer(cfg).update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = jax.tree.map(lambda e, p: cfg.ema_decay * e + (1.0 - cfg.ema_decay) * p, state["ema"], params)
    return {"params": params, "ema": ema, "opt_state": opt_state, "step": state["step"] + 1}, loss


def initial_state(cfg: TinyConfig, weights: dict, step: int = 0) -> dict:
    """A training state starting from ``weights`` (EMA equal to them, fresh optimizer moments) at ``step``."""
    return {"params": weights, "ema": weights, "opt_state": make_optimizer(cfg).init(weights),
            "step": jnp.asarray(step, jnp.int32)}


def batch_for_step(cfg: TinyConfig, tok: WordTokenizer, step: int):
    """The batch of training step ``step`` (deterministic in the seed and the step)."""
    rng = np.random.default_rng([cfg.seed, step])
    videos, captions, _ = tiny_data.sample_batch(rng, cfg.batch, frames=cfg.frames, size=cfg.size,
                                                 dtype="float32")
    drop = rng.random(len(captions)) < cfg.caption_dropout
    captions = ["" if d else c for c, d in zip(captions, drop)]
    with warnings.catch_warnings():  # two-object captions lose their last words to the context, as the shipped
        warnings.simplefilter("ignore")  # UNet was trained; one warning per batch filled 19 MB of one run's log
        return videos, tok.encode(captions)


def _batch_job(cfg: TinyConfig, step: int):
    return batch_for_step(cfg, tokenizer(), step)


def _prefetch(cfg: TinyConfig, start: int, workers: int, depth: int = 32):
    """Batches for steps start, start+1, ... rendered in worker processes (spawned: the parent holds GPU state;
    NumPy rendering holds the GIL, so threads do not keep a GPU busy), yielded in step order; ``workers`` 0 renders
    each in this process when it is asked for. Closing the generator stops the workers."""
    import concurrent.futures as cf
    import multiprocessing as mp

    if workers == 0:
        tok = tokenizer()
        yield from (batch_for_step(cfg, tok, s) for s in itertools.count(start))
        return
    pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
    try:
        pending = {s: pool.submit(_batch_job, cfg, s) for s in range(start, start + depth)}
        step = start
        while True:
            item = pending.pop(step).result()
            pending[step + depth] = pool.submit(_batch_job, cfg, step + depth)
            yield item
            step += 1
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def checkpointer(workdir):
    """The orbax manager of the training-state checkpoints in ``workdir/checkpoints`` (the latest one kept)."""
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=1))


def save_state(manager, state):
    import orbax.checkpoint as ocp

    manager.save(int(state["step"]), args=ocp.args.StandardSave(state))
    manager.wait_until_finished()


def restore_state(manager, template):
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return None
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), template)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def export_pipeline(cfg: TinyConfig, model: Denoiser, ema_params, out_dir, train_info: dict):
    """Write the EMA weights of ``model`` as a loadable pipeline (what ``jaxlongvid.load`` reads); ``train_info``
    goes into the pipeline config's ``extra["train"]``."""
    from jaxlongvid.pipeline import Pipeline, PipelineConfig, save

    config = PipelineConfig(family=model.name, unet=model.config, text=cfg.text(), vae=None, scheduler=model.scheduler,
                            num_frames=cfg.frames, num_inference_steps=25, guidance_scale=1.0, height=cfg.size,
                            width=cfg.size, extra={"train": train_info})
    pipe = Pipeline(config=config, params={"unet": ema_params["unet"], "text": ema_params["text"]},
                    tokenizer=tokenizer())
    save(pipe, out_dir, overwrite=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jaxlongvid.tiny.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=DENOISERS, default="unet",
                    help="the denoiser: unet (the shipped tiny model) or dit (Wan's architecture, tiny-dit)")
    ap.add_argument("--workdir", default="runs/tiny")
    ap.add_argument("--max-minutes", type=float, default=9.0, help="stop (and save) after this long")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--save-minutes", type=float, default=3.0)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--resume", action="store_true", help="continue from the workdir, else the shipped weights")
    ap.add_argument("--export", default=None, help="write the EMA weights as a pipeline directory at the end")
    ap.add_argument("--dtype", default="bfloat16" if jax.default_backend() == "gpu" else "float32")
    ap.add_argument("--batch", type=int, default=None, help="clips per step (default: the --model's recipe)")
    ap.add_argument("--init", default=None,
                    help="pipeline that --resume starts from when the workdir has no checkpoint (default: the "
                         "bundled one of --model, tiny or tiny-dit)")
    defaults = TinyConfig()
    ap.add_argument("--temporal-conv", action=argparse.BooleanOptionalAction, default=defaults.temporal_conv,
                    help="temporal conv blocks after every ResNet (--model unet)")
    ap.add_argument("--learning-rate", type=float, default=None,
                    help="AdamW step size after the warmup (constant; default: the --model's recipe, "
                         f"{defaults.learning_rate} for the UNet, see COMMAND_LINE_RECIPES)")
    ap.add_argument("--high-noise-fraction", type=float, default=None,
                    help="share of timesteps drawn from [--high-noise-from, T) (default: the --model's recipe)")
    ap.add_argument("--high-noise-from", type=int, default=defaults.high_noise_from)
    ap.add_argument("--text-from", default=None,
                    help="when starting from fresh weights: take the text encoder from this pipeline (tiny: the "
                         "shipped UNet's trained encoder, which already tells the colours, shapes and motions "
                         "apart); the denoiser starts fresh")
    ap.add_argument("--widen-directions", type=float, default=0.0,
                    help="when starting from fresh or --init weights: move the token embeddings of right/left "
                         "and down/up apart by this much (the shipped weights: 8 at step 50,480; see the card)")
    ap.add_argument("--attention", choices=("xla", "cudnn"), default=defaults.attention,
                    help="attention kernels in training (default: the denoiser's own; cudnn: fused attention on "
                         "NVIDIA GPUs in bfloat16)")
    ap.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)),
                    help="data-rendering processes (0: render in this process)")
    return ap


def config_from_args(args) -> TinyConfig:
    """The run's config: the options given, else the ``--model``'s recipe, else TinyConfig's defaults."""
    given = dict(learning_rate=args.learning_rate, high_noise_fraction=args.high_noise_fraction, batch=args.batch)
    chosen = {**COMMAND_LINE_RECIPES[args.model], **{k: v for k, v in given.items() if v is not None}}
    return TinyConfig(denoiser=args.model, temporal_conv=args.temporal_conv, high_noise_from=args.high_noise_from,
                      attention=args.attention, **chosen)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    return run(args, cfg, cfg.model())


def run(args, cfg: TinyConfig, model: Denoiser) -> dict:
    """The training run of ``cfg`` with the denoiser ``model`` (``cfg.model()`` from the command line) under the
    command's options ``args`` (:func:`build_parser`): checkpoints, ``--resume``, logging, ``--export``. Returns
    and prints ``{"steps", "minutes"}``."""
    if args.text_from and args.resume:
        raise ValueError("--text-from applies when starting from fresh weights, not with --resume")
    t_start = time.time()
    params = init_params(cfg, model, jax.random.key(cfg.seed))
    state = initial_state(cfg, params)
    os.makedirs(args.workdir, exist_ok=True)
    manager = checkpointer(args.workdir)
    restored = restore_state(manager, state) if args.resume else None
    if restored is not None:
        state = restored
        print(f"resumed from {args.workdir} at step {int(state['step'])}", flush=True)
        if args.widen_directions:
            print("--widen-directions ignored: it applies once, when starting from fresh or --init weights",
                  flush=True)
    else:
        weights, step = params, 0
        if args.resume:
            init = args.init or model.name
            shipped = load(init)
            weights, grown = grow_params(params, {"unet": shipped.params["unet"], "text": shipped.params["text"]})
            step = int(shipped.config.extra.get("train", {}).get("steps", 0))
            print(f"no checkpoint in {args.workdir}: resumed from the {init} weights (step {step}, fresh optimizer "
                  f"moments, {grown} new leaves at their initial values)", flush=True)
        if args.text_from:
            text, _ = grow_params(params["text"], load(args.text_from).params["text"])
            weights = {**weights, "text": text}
            print(f"text encoder from {args.text_from}", flush=True)
        if args.widen_directions:
            weights = {**weights, "text": widen_word_pairs(weights["text"], tokenizer(), OPPOSITE_DIRECTIONS,
                                                           args.widen_directions)}
        state = initial_state(cfg, weights, step)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    print(f"params: {n_params:,}  dtype: {args.dtype}  batch: {cfg.batch}  backend: {jax.default_backend()}",
          flush=True)
    dtype = jnp.dtype(args.dtype)
    log_path = os.path.join(args.workdir, "loss.csv")
    new_log = not os.path.exists(log_path)
    log = open(log_path, "a")
    if new_log:
        log.write("step,loss,seconds\n")
    start_step = int(state["step"])
    batches = _prefetch(cfg, start_step, args.workers)
    last_save = time.time()
    losses = []
    step = start_step
    key = jax.random.key(cfg.seed + 1)

    def finished():
        return (args.max_steps is not None and step >= args.max_steps) or \
            time.time() - t_start > args.max_minutes * 60

    while not finished():
        videos, tokens = next(batches)
        state, loss = train_step(cfg, model, dtype, state, videos, tokens, jax.random.fold_in(key, step))
        step += 1
        losses.append(loss)
        if step % args.log_every == 0:
            mean = float(np.mean(jax.device_get(losses)))
            losses = []
            elapsed = time.time() - t_start
            print(f"step {step}  loss {mean:.4f}  {elapsed:.0f}s", flush=True)
            log.write(f"{step},{mean:.6f},{elapsed:.1f}\n")
            log.flush()
        if finished() or time.time() - last_save > args.save_minutes * 60:
            save_state(manager, state)
            last_save = time.time()
            print(f"saved step {step}", flush=True)
    batches.close()
    log.close()
    if args.export:
        export_pipeline(cfg, model, jax.device_get(state["ema"]), args.export,
                        {"steps": step, "batch": cfg.batch, "config": dataclasses.asdict(cfg)})
        print(f"exported EMA weights to {args.export}", flush=True)
    summary = {"steps": step, "minutes": round((time.time() - t_start) / 60, 2)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

"""A tiny random Wan pipeline in pixel space, built without torch: the Wan DiT (4 heads, so that a 4-device frames
axis splits them; 2 blocks; native length 4 latent frames), a 1-layer CLIP-style text encoder of the DiT's text
width, Wan's UniPC flow scheduler. ``test_wan_sharding.py`` and ``test_probing.py`` use it."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxlongvid.models import text as text_lib
from jaxlongvid.models.tokenizers import WordTokenizer
from jaxlongvid.models.wan import WanConfig, WanTransformer
from jaxlongvid.pipeline import Pipeline, PipelineConfig
from jaxlongvid.schedulers import SchedulerConfig

N0 = 4  # native latent frames
SIZE = 8  # pixels a side: 4 x 4 tokens per frame (patch 2)
PROMPTS = ["a red circle moving left", "a blue square bouncing"]
CONFIG = WanConfig(num_heads=4, head_dim=12, in_channels=3, out_channels=3, text_dim=16, freq_dim=16, ffn_dim=32,
                   num_layers=2, native_frames=N0)  # RoPE parts 4 / 4 / 4


def random_tree(shapes, seed: int, std: float):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: (std * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def tiny_wan_pipeline(seed: int = 0) -> Pipeline:
    tokenizer = WordTokenizer.from_texts(PROMPTS, context_length=8)
    text = dataclasses.replace(text_lib.TextConfig.tiny(tokenizer.vocab_size, 8), width=CONFIG.text_dim,
                               num_heads=2, mlp_dim=32, num_layers=1)
    config = PipelineConfig(family="wan-tiny", unet=CONFIG, text=text, scheduler=SchedulerConfig.wan(),
                            num_frames=N0, num_inference_steps=2, guidance_scale=5.0, height=SIZE, width=SIZE)
    dit = jax.eval_shape(WanTransformer(CONFIG).init, jax.random.key(0), jnp.zeros((1, 1, 2, 2, 3)),
                         jnp.zeros((1,)), jnp.zeros((1, 2, CONFIG.text_dim)))["params"]
    encoder = jax.eval_shape(text_lib.TextEncoder(text).init, jax.random.key(0),
                             jnp.zeros((1, 8), jnp.int32))["params"]
    return Pipeline(config, {"unet": random_tree(dit, seed, 0.3), "text": random_tree(encoder, seed + 1, 0.1)},
                    tokenizer)

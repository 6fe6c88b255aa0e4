"""How far a tiny model's training has got, per noise level: one denoiser call on rendered clips of the synthetic
world, noised at several sigmas (flow matching: ``x = (1 - sigma) clean + sigma noise``), and the error of the
clean-clip estimate ``x - sigma v``, beside a mean image's error and the error of its frame-to-frame change
against the clips' own change (a model that has not learnt motion does no better there than predicting none).
For the flow-matching tiny DiT (``jaxlongvid/tiny_dit/checkpoint`` or an export).

    python benchmarks/one_step_denoising.py jaxlongvid/tiny_dit/checkpoint
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jaxlongvid as jlv
from jaxlongvid.tiny import data

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("model", help="a flow-matching pipeline directory")
parser.add_argument("--clips", type=int, default=8)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

pipe = jlv.load(args.model)
if pipe.config.scheduler.prediction_type != "flow":
    raise SystemExit(f"{args.model} is not a flow-matching model (prediction type "
                     f"{pipe.config.scheduler.prediction_type!r})")
rng = np.random.default_rng(args.seed)
frames = pipe.config.num_frames
scenes = [data.random_scene(rng, frames) for _ in range(args.clips)]
clean = jnp.asarray(data.render_batch(scenes, frames, pipe.config.height), jnp.float32) / 127.5 - 1.0
context = pipe.encode_prompts([data.caption(s) for s in scenes])
noise = jax.random.normal(jax.random.key(args.seed), clean.shape)
change = jnp.diff(clean, axis=1)
mean_image = float(jnp.mean((clean.mean() - clean) ** 2))
print(f"{args.model}: {args.clips} clips of {frames} frames; mean-image MSE {mean_image:.4f}, "
      f"the clips' frame-to-frame change {float(jnp.mean(change ** 2)):.4f} (MSE of predicting none)")
print(f"{'sigma':>6} {'clean MSE':>10} {'velocity MSE':>13} {'change MSE':>11}")
for sigma in (0.1, 0.3, 0.5, 0.75, 0.9, 0.97):
    noisy = (1 - sigma) * clean + sigma * noise
    t = jnp.full((args.clips,), sigma * pipe.config.scheduler.num_train_timesteps, jnp.float32)
    velocity = pipe.denoiser(noisy, t, context)
    estimate = noisy - sigma * velocity
    print(f"{sigma:6.2f} {float(jnp.mean((estimate - clean) ** 2)):10.4f} "
          f"{float(jnp.mean((velocity - (noise - clean)) ** 2)):13.4f} "
          f"{float(jnp.mean((jnp.diff(estimate, axis=1) - change) ** 2)):11.4f}")

"""Does the tiny model's first denoising step know which way "moving right" goes?

For a prompted linear motion, the training clips start on the side the object moves away from, so the mean
clip (what an ideal model predicts from pure noise, t = T) has the object's centroid move across the frame. This
script prints, per frame, the x centroid of the object's colour in

- the mean of 256 training clips of the prompt (the target at t = T),
- the model's predicted clean clip x0, averaged over 32 noisings, at t = 999 (pure noise) and t = 900,

for "moving right" and "moving left", and the mean over noisings of corr(frame, centroid) of each predicted
clip. A model that cannot tell frames apart at t = T predicts the same centroid in every frame and for both
prompts. Then the v-prediction loss of 32 linear clips (8 per direction) captioned with their true direction,
the opposite one and a perpendicular one: a model that ignores the direction word scores all three alike.
Then how close the denoiser is to time-reversal equivariance on those clips (true captions):
||reverse(f(reverse(x))) - f(x)|| / ||f(x)||. An equivariant denoiser treats a clip and its reversal alike, so
its caption cannot pick the sign of a motion (reversing "moving right" gives "moving left"). Last, how far
apart the text encoder puts the captions of opposite directions, against two perpendicular ones: a text encoder
that maps "left" and "right" to nearly the same context leaves the denoiser nothing to read the sign from.
Runs on a CPU in about four minutes:

    python benchmarks/direction_probe.py [--model DIR]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jaxlongvid
from jaxlongvid.models import text as text_model
from jaxlongvid.models.unet3d import UNet3D
from jaxlongvid.schedulers import alphas_cumprod
from jaxlongvid.tiny import data

PROMPT = "a red circle moving {} on a black background"


def red_centroid_x(clips: np.ndarray) -> np.ndarray:
    """x centroid (fraction of the width) of red-dominant pixels, per clip and frame; clips in [-1, 1]."""
    weight = np.clip(clips[..., 0] - np.maximum(clips[..., 1], clips[..., 2]), 0.0, None)
    xs = (np.arange(clips.shape[3]) + 0.5) / clips.shape[3]
    return (weight.sum(2) * xs).sum(-1) / (weight.sum((2, 3)) + 1e-6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="pipeline directory or 'tiny'")
    ap.add_argument("--noisings", type=int, default=32)
    args = ap.parse_args()
    pipe = jaxlongvid.load(args.model)
    cfg = pipe.config
    unet, encoder = UNet3D(cfg.unet), text_model.TextEncoder(cfg.text)
    abar = jnp.asarray(alphas_cumprod(cfg.scheduler))
    frames, size, b = cfg.num_frames, cfg.height, args.noisings

    @jax.jit
    def predict(clips, tokens, t, noise):
        """(predicted v, its target, predicted x0) for clips noised to timestep t (v-prediction)."""
        a = abar[t]
        noisy = jnp.sqrt(a) * clips + jnp.sqrt(1.0 - a) * noise
        context = encoder.apply({"params": pipe.params["text"]}, tokens)
        v = unet.apply({"params": pipe.params["unet"]}, noisy, jnp.full((clips.shape[0],), t), context)
        return v, jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * clips, jnp.sqrt(a) * noisy - jnp.sqrt(1.0 - a) * v

    print(f"model: {args.model}  frames: {frames}  centroid x per frame (every 3rd frame)")
    for direction in ("right", "left"):
        prompt = PROMPT.format(direction)
        rng = np.random.default_rng(0)
        scenes = [data.scene_from_prompt(prompt, rng, frames) for _ in range(256)]
        clips = data.render_batch(scenes, frames, size).astype(np.float32) / 127.5 - 1.0
        target = red_centroid_x(clips.mean(0, keepdims=True))[0]
        print(f"{direction:5s} training mean    {np.array2string(target[::3], precision=3)}")
        tokens = pipe.tokenizer.encode([prompt] * b)
        for t in (999, 900):
            noise = jax.random.normal(jax.random.key(t), (b, frames, size, size, 3))
            x0 = np.asarray(predict(jnp.asarray(clips[:b]), tokens, t, noise)[2])
            per_clip = red_centroid_x(x0)
            corr = np.mean([np.corrcoef(np.arange(frames), c)[0, 1] for c in per_clip])
            mean = red_centroid_x(x0.mean(0, keepdims=True))[0]
            print(f"{direction:5s} model x0, t={t} {np.array2string(mean[::3], precision=3)}  "
                  f"mean corr(frame, x) {corr:+.2f}")

    directions = ["left", "right", "up", "down"] * 8
    swaps = {"opposite": {"left": "right", "right": "left", "up": "down", "down": "up"},
             "perpendicular": {"left": "up", "right": "down", "up": "left", "down": "right"}}
    rng = np.random.default_rng(1)
    prompts = [f"a {c} {s} moving {d} on a black background" for c, s, d in
               zip(["red", "green", "blue", "yellow"] * 8, ["circle", "triangle", "diamond", "square"] * 8, directions)]
    clips = data.render_batch([data.scene_from_prompt(p, rng, frames) for p in prompts], frames, size)
    clips = jnp.asarray(clips.astype(np.float32) / 127.5 - 1.0)
    captions = {"true": prompts, **{name: [p.replace(f"moving {d}", f"moving {table[d]}")
                                          for p, d in zip(prompts, directions)] for name, table in swaps.items()}}
    print("v-loss of 32 linear clips by the direction word in the caption")
    for t in (500, 800, 950):
        noise = jax.random.normal(jax.random.key(t + 1), clips.shape)
        line = []
        for name, caption in captions.items():
            v, target, _ = predict(clips, pipe.tokenizer.encode(caption), t, noise)
            line.append(f"{name} {float(jnp.mean((v - target) ** 2)):.5f}")
        print(f"t={t}: " + "  ".join(line))
    tokens = pipe.tokenizer.encode(prompts)
    print("time-reversal equivariance error of the predicted v")
    for t in (999, 950, 900):
        noise = jax.random.normal(jax.random.key(t + 2), clips.shape)
        forward = predict(clips, tokens, t, noise)[0]
        backward = predict(clips[:, ::-1], tokens, t, noise[:, ::-1])[0][:, ::-1]
        print(f"t={t}: {float(jnp.linalg.norm(backward - forward) / jnp.linalg.norm(forward)):.4f}")
    caption = PROMPT.format
    context = lambda words: np.asarray(encoder.apply({"params": pipe.params["text"]},
                                                     pipe.tokenizer.encode([caption(w) for w in words])))
    print("text encoder: largest per-token distance between the outputs for two captions "
          f"({caption('<word>')!r}), and between the two words' token embeddings")
    table = np.asarray(pipe.params["text"]["token_embedding"]["embedding"])
    for first, second in (("right", "left"), ("down", "up"), ("right", "up")):
        out = context([first, second])
        ids = [pipe.tokenizer.ids[w] for w in (first, second)]
        print(f"{first} vs {second}: outputs {np.linalg.norm(out[0] - out[1], axis=-1).max():.2f}  "
              f"embeddings {np.linalg.norm(table[ids[0]] - table[ids[1]]):.2f}")


if __name__ == "__main__":
    main()

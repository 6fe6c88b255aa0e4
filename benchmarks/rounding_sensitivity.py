"""How far does float32-rounding-sized noise move a sample? Each floating weight of the tiny model is multiplied by
(1 + 1e-7 z), z standard normal, and the same 128-frame sample (same seed) is drawn with both weight sets on one
device; prints the max / mean absolute difference of the uint8 frames per method.

    python benchmarks/rounding_sensitivity.py

Used to tell a sharding bug from a method's own sensitivity: a 2-GPU run reorders float reductions, which
perturbs activations at about this scale.
"""
import jax, jax.numpy as jnp, numpy as np, dataclasses, time
import jaxlongvid as jlv
pipe = jlv.load("tiny")
key = jax.random.key(123)
leaves, tree = jax.tree.flatten(pipe.params)
keys = jax.random.split(key, len(leaves))
noisy = [x * (1 + 1e-7 * jax.random.normal(k, x.shape)) if jnp.issubdtype(x.dtype, jnp.floating) else x for x, k in zip(leaves, keys)]
pert = dataclasses.replace(pipe, params=jax.tree.unflatten(tree, noisy))
prompt = "a red circle moving right on a black background"
for method in ["direct", "longdiff-no-ifs", "longdiff-no-pm", "longdiff"]:
    t = time.time()
    a = jlv.sample(pipe, prompt, num_frames=128, method=method, seed=0, progress=False)
    b = jlv.sample(pert, prompt, num_frames=128, method=method, seed=0, progress=False)
    d = np.abs(a.astype(int) - b.astype(int))
    print(f"{method}: max {d.max()}  mean {d.mean():.4f}  pixels>1: {(d > 1).sum()}  ({time.time() - t:.0f} s)", flush=True)

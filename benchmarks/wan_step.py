"""One classifier-free-guidance step of the Wan2.1 DiT: seconds per step, MFU and peak memory, beside diffusers.

The step is the denoiser on the guidance pair (batch 2: negative and positive prompt, 512 text tokens each) and
the guidance combination, as ``jaxlongvid.sample`` runs it. Weights are random (the speed does not depend on
them). On one H100 / H200, the issue's setting (1.3B, 480x832, 81 frames = 21 latent frames, bfloat16):

    python benchmarks/wan_step.py --torch

``--torch`` also times diffusers' ``WanTransformer3DModel`` (PyTorch, bfloat16, SDPA attention) at the same
settings in the same process and prints the ratio. On a CPU, a tiny model in float32 (what the test runs):

    python benchmarks/wan_step.py --size tiny --height 32 --width 32 --frames 5 --dtype float32 --repeats 1 --torch

FLOPs counted (multiply-adds x 2, per video of the pair, per layer; S tokens, L text tokens, D model width,
F the FFN width): self-attention projections q, k, v, o ``8 S D^2``; its logits and weighted sum ``4 S^2 D``;
cross-attention q, o ``4 S D^2``, its k, v on the text ``4 L D^2``, logits and sum ``4 S L D``; FFN
``4 S D F``; plus the patch embedding ``2 S (16 * 4) D``, the head ``2 S D (4 * 16)`` and the text embedding
``2 L (4096 D + D^2)``. Element-wise work (norms, RoPE, softmax, modulation) is not counted. MFU = counted
FLOPs / time / the chip's dense bfloat16 peak (989 TFLOP/s for H100 SXM and H200; ``--peak-tflops`` otherwise).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jaxlongvid.models.wan import WanConfig, WanTransformer

SIZES = {"1.3b": WanConfig.wan_1_3b(), "14b": WanConfig.wan_14b(),
         "tiny": WanConfig(num_heads=3, head_dim=32, ffn_dim=256, num_layers=2, text_dim=64)}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bfloat16, SXM


def latent_grid(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Latent frames / rows / columns of a video: the Wan VAE maps 1 + 4k frames to 1 + k, pixels 8:1."""
    if (frames - 1) % 4 or height % 16 or width % 16:
        raise ValueError(f"need frames = 4k + 1 and height, width multiples of 16; got {frames}, {height}, {width}")
    return (frames - 1) // 4 + 1, height // 8, width // 8


def step_flops(config: WanConfig, grid: tuple[int, int, int], text_len: int, batch: int) -> float:
    """Counted FLOPs of one denoiser call on ``batch`` videos of latent ``grid`` (see the module docstring)."""
    pt, ph, pw = config.patch_size
    s = (grid[0] // pt) * (grid[1] // ph) * (grid[2] // pw)
    d, f, n = config.dim, config.ffn_dim, text_len
    per_layer = 8 * s * d * d + 4 * s * s * d + 4 * s * d * d + 4 * n * d * d + 4 * s * n * d + 4 * s * d * f
    patch = pt * ph * pw
    edges = 2 * s * config.in_channels * patch * d + 2 * s * d * patch * config.out_channels \
        + 2 * n * (config.text_dim * d + d * d)
    return float(batch * (config.num_layers * per_layer + edges))


def timed(fn, repeats: int) -> list[float]:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def jax_step(config: WanConfig, grid, text_len: int, dtype: str, implementation, repeats: int):
    """Seconds per guided step of the Flax model (list of repeats) and the device's peak bytes (or None)."""
    model = WanTransformer(config, dtype=jnp.dtype(dtype), attention_implementation=implementation)
    pt, ph, pw = config.patch_size
    small = jnp.zeros((1, pt, ph, pw, config.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 1, config.text_dim))
    params = jax.jit(model.init)(jax.random.key(0), *small)["params"]
    params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)  # stored as the compute dtype
    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(keys[0], (1,) + tuple(grid) + (config.in_channels,), jnp.float32)
    context = jax.random.normal(keys[1], (2, text_len, config.text_dim), jnp.float32).astype(dtype)

    @jax.jit
    def step(params, x, context):
        pair = jnp.concatenate([x, x])
        out = model.apply({"params": params}, pair, jnp.full((2,), 999.0), context)
        uncond, cond = jnp.split(out, 2)
        return uncond + 5.0 * (cond - uncond)

    times = timed(lambda: step(params, x, context).block_until_ready(), repeats)
    stats = jax.devices()[0].memory_stats() or {}
    return times, stats.get("peak_bytes_in_use")


def torch_step(config: WanConfig, grid, text_len: int, dtype: str, repeats: int):
    """The same for diffusers' WanTransformer3DModel (CUDA if present, else CPU)."""
    import torch
    from diffusers import WanTransformer3DModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
    with torch.device(device):
        model = WanTransformer3DModel(patch_size=config.patch_size, num_attention_heads=config.num_heads,
                                      attention_head_dim=config.head_dim, in_channels=config.in_channels,
                                      out_channels=config.out_channels, text_dim=config.text_dim,
                                      freq_dim=config.freq_dim, ffn_dim=config.ffn_dim, num_layers=config.num_layers,
                                      cross_attn_norm=config.cross_attn_norm, eps=config.eps)
    model = model.to(tdtype).eval()
    for name, module in model.named_modules():  # what from_pretrained(torch_dtype=...) keeps in float32
        if name.split(".")[-1] in model._keep_in_fp32_modules:
            module.float()
    x = torch.randn((1, config.in_channels) + tuple(grid), device=device, dtype=tdtype)
    context = torch.randn((2, text_len, config.text_dim), device=device, dtype=tdtype)
    t = torch.full((2,), 999, device=device)

    def step():
        with torch.no_grad():
            out = model(torch.cat([x, x]), t, context, return_dict=False)[0]
            uncond, cond = out.float().chunk(2)
            result = uncond + 5.0 * (cond - uncond)
        if device == "cuda":
            torch.cuda.synchronize()
        return result

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = timed(step, repeats)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return times, peak


def peak_tflops(explicit):
    if explicit:
        return explicit
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)


def report(name: str, times, peak, flops: float, peak_flops):
    med = statistics.median(times)
    mfu = f"{flops / med / (peak_flops * 1e12) * 100:.1f}%" if peak_flops else "n/a"
    mem = f"{peak / 2**30:.1f} GiB" if peak else "n/a"
    print(f"{name:28s} {med:9.4f} s/step (min {min(times):.4f}, {len(times)} runs)  "
          f"{flops / med / 1e12:8.1f} TFLOP/s  MFU {mfu:>6s}  peak memory {mem}")
    return med


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1.3b")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=81, help="video frames (4k + 1)")
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--attention", default="auto", help="jax.nn.dot_product_attention implementation: "
                        "auto (cudnn on GPU, else xla), cudnn or xla")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--torch", action="store_true", help="also time diffusers' WanTransformer3DModel")
    args = parser.parse_args(argv)

    config = SIZES[args.size]
    grid = latent_grid(args.frames, args.height, args.width)
    implementation = args.attention
    if implementation == "auto":
        implementation = "cudnn" if jax.default_backend() == "gpu" else None
    elif implementation == "xla":
        implementation = None
    flops = step_flops(config, grid, args.text_len, batch=2)
    peak = peak_tflops(args.peak_tflops)
    print(f"Wan {args.size}: {args.frames} frames {args.height}x{args.width} -> latent {grid}, "
          f"{grid[0] * (grid[1] // 2) * (grid[2] // 2)} tokens, CFG pair, {args.dtype}, "
          f"device {jax.devices()[0].device_kind}; {flops / 1e12:.1f} TFLOP counted per step")
    jax_time = report(f"jaxlongvid ({implementation or 'xla'})",
                      *jax_step(config, grid, args.text_len, args.dtype, implementation, args.repeats), flops, peak)
    if args.torch:
        torch_time = report("diffusers (torch, SDPA)", *torch_step(config, grid, args.text_len, args.dtype,
                                                                  args.repeats), flops, peak)
        print(f"speed-up of jaxlongvid over diffusers: {torch_time / jax_time:.2f}x")


if __name__ == "__main__":
    main()

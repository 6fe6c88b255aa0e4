"""The ``jaxlongvid`` command: ``sample``, ``info``, ``convert``, ``bench shapes`` and ``probe``.

Examples::

    jaxlongvid sample --prompt "a red circle bouncing" --frames 64 --method longdiff --out circle.mp4
    jaxlongvid sample --model ckpt/lavie --prompt "a corgi on the beach" --frames 128 --method freeloc \\
        --devices 8 --out corgi.mp4
    jaxlongvid info --model ckpt/lavie
    jaxlongvid convert lavie --unet lavie_base.pt --sd stable-diffusion-v1-4 --out ckpt/lavie
    jaxlongvid convert wan --diffusers Wan2.1-T2V-1.3B-Diffusers --out ckpt/wan
    jaxlongvid bench shapes --frames 64,128 --methods direct,longdiff --prompts 8 --seeds 2 --out bench/

Subcommands are registered in :data:`SUBCOMMANDS`: a function that adds its parser to the subparsers object and
sets ``func`` (called with the parsed arguments, returns an exit code). Adding one (e.g. ``bench``) is one
function and one list entry.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from typing import Callable, Optional, Sequence

EXIT_ERROR = 1  # a request that cannot be served (bad value, missing file); argparse uses 2 for bad syntax


class CommandError(Exception):
    """A request the command cannot serve (printed as one line, exit code 1)."""


class LazyParser(argparse.ArgumentParser):
    """A (sub)command parser whose options come from ``arguments(parser)``, called on first use: a command's
    module (which may start JAX) is imported only when that command runs, not for ``--help`` of the others."""

    def __init__(self, *args, arguments: Optional[Callable] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._arguments = arguments

    def parse_known_args(self, args=None, namespace=None):
        if self._arguments is not None:
            add, self._arguments = self._arguments, None
            add(self)
        return super().parse_known_args(args, namespace)


# ---- sample ------------------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate a video from a text prompt",
                       description="Generate a video from a text prompt and write it as .mp4, .gif or a .png "
                                   "contact sheet. Unset options take the model's defaults.")
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("--frames", type=_positive_int, help="number of frames (default: the model's)")
    p.add_argument("--method", default="auto",
                   help="long-video method: auto, direct, freenoise, freelong, longdiff, freeloc, sliding-window, "
                        "longdiff-no-pm, longdiff-no-ifs, clip, interpolate, group-only, keepmotion (default: auto, "
                        "the recommended method for the model and length: direct up to the model's native frame "
                        "count, see jaxlongvid.sampling.AUTO_TABLE past it); NAME:FIELD=VALUE,... to change part "
                        "fields (e.g. longdiff:num_groups=8,window=4); or the JSON file of `jaxlongvid probe --out` "
                        "for its per-layer routing")
    p.add_argument("--out", required=True, help="output file: .mp4, .gif or .png (contact sheet)")
    p.add_argument("--model", default="tiny",
                   help="a pipeline directory, or a bundled model: 'tiny' (the UNet) or 'tiny-dit' (Wan's DiT)")
    p.add_argument("--steps", type=_positive_int, help="denoising steps")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (<= 1: off)")
    p.add_argument("--negative-prompt", help="negative prompt (default: the model's, usually empty)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--eta", type=float, help="DDIM eta (default: the model's)")
    p.add_argument("--devices", type=_positive_int,
                   help="shard the frames over this many devices (a frames x data mesh; frames must divide "
                        "evenly). On CPU this also sets XLA's host device count (XLA_FLAGS)")
    p.add_argument("--height", type=_positive_int, help="frame height in pixels")
    p.add_argument("--width", type=_positive_int, help="frame width in pixels")
    p.add_argument("--cond-fps", type=_positive_int, help="fps the model is conditioned on (VideoCrafter2)")
    p.add_argument("--fps", type=_positive_float, default=8.0, help="playback fps of the written video (default: 8)")
    p.add_argument("--sheet-every", type=_positive_int, help=".png: put every K-th frame on the sheet")
    p.add_argument("--precision", choices=("default", "high", "highest"),
                   help="matmul/convolution precision (jax.default_matmul_precision; default: highest for float32 "
                        "models, so GPUs do not round float32 to TF32, JAX's setting for bfloat16 ones)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true",
                   help="sample even when the memory estimate says the request does not fit the device")
    p.set_defaults(func=run_sample)


def _host_devices_for_cpu(count: Optional[int]) -> None:
    """Let a CPU run see ``count`` host devices: XLA reads the flag when its CPU backend starts (on the first
    device query, not at ``import jax``), so this works until then; GPU and TPU backends ignore it."""
    if not count or count < 2:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def run_sample(args) -> int:
    """Everything checkable is checked before JAX compiles anything: the output path, the method, the model's
    config and a memory estimate (:mod:`jaxlongvid.memory`); an XLA out-of-memory is reported with advice."""
    _host_devices_for_cpu(args.devices)
    from jaxlongvid import files, video

    ext = os.path.splitext(args.out)[1].lower()
    if ext not in video.FORMATS:
        raise CommandError(f"--out must end in one of {', '.join(video.FORMATS)}, got {args.out!r}")
    files.check_output_file(args.out)
    import jax

    import jaxlongvid.pipeline as pipeline_lib
    from jaxlongvid import methods, sampling

    method = methods.parse_method(args.method)
    config = pipeline_lib.load_config(args.model)
    if method == methods.AUTO:  # resolved here once, so the memory check sees the method that will run
        method = sampling.auto_method(config, config.latent_frames(args.frames or config.num_frames))
    if not args.force:
        check_memory(config, method, args)
    pipe = pipeline_lib.load(args.model)
    try:
        frames = sampling.sample(pipe, args.prompt, num_frames=args.frames, method=method, seed=args.seed,
                                 num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.height,
                                 width=args.width, negative_prompt=args.negative_prompt, fps=args.cond_fps,
                                 eta=args.eta, devices=args.devices, progress=not args.no_progress,
                                 precision=args.precision)
    except Exception as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        first = str(e).splitlines()[0][:300]
        raise CommandError(f"the device ran out of memory ({first}); try fewer --frames, more --devices, a smaller "
                           f"--height/--width, or a bfloat16 model") from None
    if jax.process_index() == 0:
        video.save_video(frames, args.out, fps=args.fps, every=args.sheet_every)
        print(f"wrote {args.out}: {frames.shape[0]} frames, {frames.shape[1]}x{frames.shape[2]}")
    return 0


def check_memory(config, method, args) -> None:
    """Refuse, with the estimate and the frame count that would fit, a request that cannot fit one device."""
    import jax

    import jaxlongvid.pipeline as pipeline_lib
    from jaxlongvid import memory

    frames = args.frames or config.num_frames
    latent = config.latent_frames(frames)  # the estimate counts the frames the denoiser runs on
    devices = args.devices or 1
    guidance = config.guidance_scale if args.guidance is None else args.guidance
    request = dict(config=config, height=args.height or config.height, width=args.width or config.width,
                   method=method, devices=devices, guided=guidance > 1,
                   weight_bytes=memory.folder_bytes(os.path.join(pipeline_lib.resolve(args.model),
                                                                 pipeline_lib.PARAMS_DIR)))
    need, have = memory.estimate_bytes(num_frames=latent, **request), memory.available_bytes()
    if need <= have:
        return
    fit = memory.frames_that_fit(have, step=devices, **request)  # latent frames
    fit = 1 + config.temporal_factor * (fit - 1) if fit and config.temporal_factor > 1 else fit
    device = jax.devices()[0]
    raise CommandError(f"--frames {frames}: estimated {need / memory.GB:.1f} GB per device, but a "
                       f"{device.platform} device has {have / memory.GB:.1f} GB available; about {fit} frames fit "
                       f"on {devices} device(s) at {request['height']}x{request['width']}. Use fewer --frames, more "
                       f"--devices or a smaller size, or --force to try anyway")


# ---- info --------------------------------------------------------------------------------------------------------
def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show the installation, the devices and a model's configuration",
                       description="Show jaxlongvid's and JAX's versions, the devices, the methods, and with --model "
                                   "a pipeline's configuration and parameter counts.")
    p.add_argument("--model", help="a pipeline directory, or 'tiny' / 'tiny-dit'")
    p.set_defaults(func=run_info)


def run_info(args) -> int:
    import jax

    import jaxlongvid
    import jaxlongvid.pipeline as pipeline_lib
    from jaxlongvid.methods import PLAN_PRESETS, PRESETS, TIME_PRESETS

    devices = jax.devices()
    print(f"jaxlongvid {jaxlongvid.__version__}, jax {jax.__version__}")
    print(f"devices: {len(devices)} x {devices[0].platform} ({devices[0].device_kind}), "
          f"processes: {jax.process_count()}")
    print(f"methods: {', '.join([*PRESETS, *PLAN_PRESETS, *TIME_PRESETS])}, auto")
    for name, (directory, _) in pipeline_lib.BUNDLED.items():
        there = os.path.isfile(os.path.join(directory, pipeline_lib.CONFIG_FILE))
        print(f"bundled {name} model: {'yes' if there else 'not installed'}")
    if args.model is None:
        return 0
    pipe = pipeline_lib.load(args.model)
    c = pipe.config
    print(f"model: {pipeline_lib.resolve(args.model)}")
    print(f"  family: {c.family}, compute dtype: {c.dtype}")
    print(f"  denoiser: {type(c.unet).__name__}, native frames: {c.native_frames}, "
          f"{'latent' if c.vae is not None else 'pixel'} space, {c.latent_channels} channels, "
          f"sizes in multiples of {c.spatial_factor}")
    print(f"  text: {type(c.text).__name__}; VAE: {type(c.vae).__name__ if c.vae is not None else 'none'}")
    s = c.scheduler
    if s.prediction_type == "flow":
        print(f"  scheduler: {s.kind} (flow matching), shift {s.flow_shift}")
    else:
        print(f"  scheduler: {s.kind}, {s.beta_schedule} betas {s.beta_start}..{s.beta_end}, "
              f"{s.prediction_type}, spacing {s.timestep_spacing}")
    latent = f" ({c.latent_frames(c.num_frames)} latent)" if c.temporal_factor > 1 else ""
    print(f"  defaults: {c.num_frames} frames{latent}, {c.height}x{c.width}, {c.num_inference_steps} steps, "
          f"guidance {c.guidance_scale}")
    words = getattr(pipe.tokenizer, "words", None)
    if words is not None:  # a word-level tokenizer: other words are read as <unk>
        print(f"  vocabulary ({len(words)} words; other words are unknown to the model, prompts are cut after "
              f"{pipe.tokenizer.context_length - 2} words): {' '.join(words)}")
    counts = pipe.num_parameters()
    print("  parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + f" (total {sum(counts.values()):,})")
    return 0


# ---- convert -----------------------------------------------------------------------------------------------------
def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a PyTorch checkpoint into a jaxlongvid pipeline directory",
                       description="Convert a PyTorch checkpoint (LaVie, VideoCrafter1/2, ModelScope, Wan2.1) into a "
                                   "jaxlongvid pipeline directory. Pickles are read with weights_only=True; every "
                                   "key and shape is checked and non-finite weights are refused; the directory "
                                   "appears only when complete. Needs pip install 'jaxlongvid[convert]'.")
    families = p.add_subparsers(dest="family", required=True, metavar="FAMILY")

    lavie = families.add_parser("lavie", help="LaVie base (lavie_base.pt on Stable Diffusion 1.4's folders)")
    lavie.add_argument("--unet", required=True, help="lavie_base.pt (a UNet state dict, or {'ema': ...})")
    lavie.add_argument("--sd", help="the stable-diffusion-v1-4 folder (vae/, text_encoder/, tokenizer/)")
    lavie.add_argument("--config", help="a JSON file overriding the UNet config")
    lavie.set_defaults(convert="convert_lavie", keys=("unet", "sd", "config"))

    vc = families.add_parser("videocrafter", help="VideoCrafter1 / VideoCrafter2 text-to-video model.ckpt")
    vc.add_argument("--ckpt", required=True, help="model.ckpt")
    vc.add_argument("--version", required=True, type=int, choices=(1, 2), help="VideoCrafter 1 or 2")
    vc.add_argument("--config", help="the inference YAML or a JSON UNet config (default: the release's)")
    vc.add_argument("--vocab", help="OpenCLIP's BPE vocabulary bpe_simple_vocab_16e6.txt.gz (default: next to "
                                    "--ckpt, else the installed open_clip package's)")
    vc.set_defaults(convert="convert_videocrafter", keys=("ckpt", "version", "config", "vocab"))

    ms = families.add_parser("modelscope", help="ModelScope T2V / ZeroScope in diffusers format")
    ms.add_argument("--diffusers", required=True, help="the diffusers pipeline folder (unet/, vae/, ...)")
    ms.set_defaults(convert="convert_modelscope", keys=("diffusers",))

    wan = families.add_parser("wan", help="Wan2.1 text-to-video (diffusers folder or the original release)",
                              description="Wan2.1 text-to-video. Parts the folder lacks (VAE, text encoder with "
                                          "its tokenizer) are left out: the pipeline then runs its denoiser only.")
    layout = wan.add_mutually_exclusive_group(required=True)
    layout.add_argument("--diffusers", help="a diffusers Wan folder: transformer/ and any of vae/, text_encoder/ + "
                                            "tokenizer/, scheduler/")
    layout.add_argument("--original", help="the original release folder: config.json + "
                                           "diffusion_pytorch_model*.safetensors, and any of Wan2.1_VAE.pth, "
                                           "models_t5_umt5-xxl-enc-bf16.pth with google/umt5-xxl/")
    wan.set_defaults(convert="convert_wan", keys=("diffusers", "original"))

    for family in (lavie, vc, ms, wan):
        family.add_argument("--out", required=True, help="the pipeline directory to write")
        family.add_argument("--overwrite", action="store_true",
                            help="replace an existing pipeline directory (anything else at --out is refused)")
        family.set_defaults(func=run_convert)


def run_convert(args) -> int:
    try:
        from convert import pipelines
    except ModuleNotFoundError as e:
        raise CommandError(f"jaxlongvid convert needs the converters ({e}); install with "
                           f"pip install 'jaxlongvid[convert]'") from e
    import jaxlongvid.pipeline as pipeline_lib

    pipeline_lib.check_target(args.out, args.overwrite)  # before the slow part
    kwargs = {key: getattr(args, key) for key in args.keys}
    try:
        out = getattr(pipelines, args.convert)(**kwargs, out=args.out, overwrite=args.overwrite)
    except ModuleNotFoundError as e:
        raise CommandError(f"jaxlongvid convert needs {e.name} ({e}); install the converters' dependencies with "
                           f"pip install 'jaxlongvid[convert]'") from e
    print(f"wrote {out if out is not None else args.out}")
    return 0


# ---- bench -------------------------------------------------------------------------------------------------------
def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark",
                       description="Benchmarks: `bench shapes` samples and scores ShapesBench on the tiny model.")
    suites = p.add_subparsers(dest="suite", required=True, metavar="SUITE")
    shapes = suites.add_parser("shapes", help="ShapesBench: sample and score every (method, frames, prompt, seed)",
                               description="ShapesBench on the tiny model's synthetic world: writes results.csv, "
                                           "table.md and one plot per metric; a rerun resumes the CSV.",
                               arguments=_bench_arguments)
    shapes.set_defaults(func=run_bench_shapes)


def _bench_arguments(parser) -> None:
    from jaxlongvid.bench import runner

    runner.add_arguments(parser)


def run_bench_shapes(args) -> int:
    """Benchmarks often share a GPU (one process per method or length): each takes device memory as it needs it
    instead of XLA's default 75% at start-up (read when the backend starts, so set before the first device use;
    an explicit setting in the environment wins)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    _host_devices_for_cpu(args.devices)
    from jaxlongvid.bench import runner

    return runner.run_from_args(args)


# ---- probe -------------------------------------------------------------------------------------------------------
def _add_probe(sub) -> None:
    sub.add_parser("probe", help="FreeLOC layer probing: per-layer sensitivity scores and routing",
                   description="FreeLOC's layer probing: for each temporal attention layer, the attention-entropy "
                               "change from native to long videos (context) and the logit change when positions "
                               "leave the trained range (position); prints the routing they imply and writes it "
                               "with --out as JSON, which `sample --method FILE.json` accepts.",
                   arguments=_probe_arguments)


def _probe_arguments(parser) -> None:
    from jaxlongvid import probing

    probing.add_arguments(parser)
    parser.set_defaults(func=probing.run_from_args)


# ---- entry -------------------------------------------------------------------------------------------------------
SUBCOMMANDS: list[Callable] = [_add_sample, _add_info, _add_convert, _add_bench, _add_probe]


def build_parser() -> argparse.ArgumentParser:
    from jaxlongvid import __version__

    parser = argparse.ArgumentParser(prog="jaxlongvid", description="Training-free long video generation in JAX.")
    parser.add_argument("--version", action="version", version=f"jaxlongvid {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=LazyParser)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    show = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning):
            print(f"jaxlongvid {args.command}: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    try:
        warnings.showwarning = one_line  # the command's own warnings (e.g. words the model does not know)
        return args.func(args)
    except (ValueError, OSError, CommandError) as e:
        print(f"jaxlongvid {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())

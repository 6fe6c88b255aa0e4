"""ShapesBench runner: sample every (method, frames, prompt, seed), score it, write a CSV, a table and plots.

Outputs in ``out_dir``:
- ``results.csv``: one row per video (method, frames, prompt, seed, the metrics, seconds). Rows are appended
  as they are made and a rerun skips the rows already there, so a long run resumes across device commands.
- ``table.md``: per frame count, mean ± std over prompts x seeds per method, columns as in the papers
  (SC, BC, MS, TF, IQ, TA, DD).
- ``<metric>.png``: the metric's mean against the number of frames, one line per method (matplotlib when it
  is installed; otherwise a plain raster drawn with NumPy, whose colour legend is written in ``table.md``).
- ``config.json``: the settings of the run.

The ``ground-truth`` rows (``reference=True``) score clips rendered by the data generator for the same prompts
and seeds: the ceiling of each metric at each length. ``seconds`` is the wall time of one ``sample`` call
(the first call of each method and length includes compilation).

Command line: :func:`add_arguments` and :func:`run_from_args` implement ``jaxlongvid bench shapes --frames
64,128,256 --methods direct,freenoise,... --prompts K --seeds S --out DIR``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections import defaultdict

import numpy as np

from jaxlongvid.bench import metrics
from jaxlongvid.tiny import data, vocab

REFERENCE = "ground-truth"
FIELDS = ("method", "frames", "prompt", "seed", *metrics.METRICS, "seconds")
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (120, 120, 255))


def prompts(k: int, seed: int = 0, motions=vocab.MOVING_MOTIONS, with_background: bool = True) -> list[str]:
    """``k`` distinct single-object benchmark prompts with balanced colours, shapes, motions and backgrounds.

    Each new prompt draws every attribute at random among its least-used values (so the counts of any value
    differ by at most one), redrawing on a repeat. ``still`` is left out by default: the benchmark is about
    long motion (and a still prompt's DD is 0 by design).
    """
    motions = tuple(motions)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for m in motions:
        if m not in vocab.MOTIONS:
            raise ValueError(f"unknown motion {m!r}; expected some of {list(vocab.MOTIONS)}")
    tables = [tuple(vocab.COLOURS), vocab.SHAPES, motions] + ([vocab.BACKGROUNDS] if with_background else [])
    if k > math.prod(len(t) for t in tables):
        raise ValueError(f"only {math.prod(len(t) for t in tables)} distinct prompts exist, asked for {k}")
    rng = np.random.default_rng(seed)
    counts = [dict.fromkeys(t, 0) for t in tables]
    chosen, seen = [], set()
    while len(chosen) < k:
        for attempt in range(1000):
            slack = attempt // 100  # after many repeats, allow values used a little more
            combo = []
            for count in counts:
                low = min(count.values())
                combo.append(str(rng.choice([v for v, n in count.items() if n <= low + slack])))
            if tuple(combo) not in seen:
                break
        seen.add(tuple(combo))
        for count, value in zip(counts, combo):
            count[value] += 1
        text = vocab.OBJECT_TEMPLATE.format(colour=combo[0], shape=combo[1], motion=vocab.MOTIONS[combo[2]])
        if with_background:
            text += " " + vocab.BACKGROUND_TEMPLATE.format(background=combo[3])
        chosen.append(text)
    return chosen


def _method_name(method) -> str:
    return method if isinstance(method, str) else getattr(method, "name", str(method))


def _read_done(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["frames"], row["seed"] = int(row["frames"]), int(row["seed"])
        for key in (*metrics.METRICS, "seconds"):
            row[key] = float(row[key])
    return rows


def _append(path: str, row: dict) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: row[k] for k in FIELDS})


def _default_sample():
    import jaxlongvid  # late: the sampler lives in the package root and pulls in the models

    return jaxlongvid.sample


def run_shapes_bench(pipe, methods, frames_list, prompts, seeds, out_dir, steps=None, guidance=None, *,
                     fps: float = 8.0, reference: bool = True, reference_size: int | None = None,
                     sample_fn=None, save_videos: bool = False, log=print, **sample_kwargs) -> list[dict]:
    """Sample and score every (method, frames, prompt, seed); write the outputs listed in the module doc.

    ``pipe``: a loaded pipeline, or a name / directory for ``jaxlongvid.load``. ``methods``: preset names or
    Method values. ``steps`` / ``guidance``: ``num_inference_steps`` / ``guidance_scale`` (None: the
    pipeline's defaults). ``reference_size``: side of the ground-truth clips (None: that of the sampled videos,
    or 32 if every sampled row was resumed from the CSV). ``sample_fn`` replaces ``jaxlongvid.sample`` (same
    signature). Extra keyword arguments go to the sampler. Returns all rows, including those of earlier runs
    found in the CSV.
    """
    frames_list, prompts, seeds = [int(f) for f in frames_list], list(prompts), [int(s) for s in seeds]
    methods = list(methods)
    if not (methods and frames_list and prompts and seeds):
        raise ValueError("methods, frames_list, prompts and seeds must all be non-empty")
    for p in prompts:
        data.parse_prompt(p)  # fail early on a prompt the metrics cannot read
    if sample_fn is None:
        sample_fn = _default_sample()
        sample_kwargs.setdefault("progress", False)
    if isinstance(pipe, (str, os.PathLike)):
        import jaxlongvid

        pipe = jaxlongvid.load(pipe)
    if steps is not None:
        sample_kwargs["num_inference_steps"] = steps
    if guidance is not None:
        sample_kwargs["guidance_scale"] = guidance
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "results.csv")
    rows = _read_done(csv_path)
    done = {(r["method"], r["frames"], r["prompt"], r["seed"]) for r in rows}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({"methods": [_method_name(m) for m in methods], "frames": frames_list, "prompts": prompts,
                   "seeds": seeds, "fps": fps, "reference": reference,
                   "sample_kwargs": {k: repr(v) for k, v in sample_kwargs.items()}}, f, indent=1)

    size = reference_size
    for frames in frames_list:
        for method in methods:
            name = _method_name(method)
            for prompt in prompts:
                for seed in seeds:
                    if (name, frames, prompt, seed) in done:
                        continue
                    start = time.perf_counter()
                    video = np.asarray(sample_fn(pipe, prompt, num_frames=frames, method=method, seed=seed,
                                                 **sample_kwargs))
                    seconds = time.perf_counter() - start
                    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[0] != frames:
                        raise ValueError(f"sample returned {video.dtype} {video.shape} for {frames} frames; "
                                         "expected uint8 [frames, height, width, 3]")
                    size = size or int(min(video.shape[1:3]))
                    row = _score(name, frames, prompt, seed, video, seconds, fps)
                    rows.append(row)
                    _append(csv_path, row)
                    if save_videos:
                        np.save(os.path.join(out_dir, f"{name}_{frames}_{prompts.index(prompt)}_{seed}.npy"),
                                video)
                    log(f"{name} {frames} frames seed {seed} {prompt!r}: "
                        + " ".join(f"{m} {row[m]:.1f}" for m in metrics.METRICS) + f" ({seconds:.1f} s)")
        if reference:
            size = size or 32
            for prompt in prompts:
                for seed in seeds:
                    if (REFERENCE, frames, prompt, seed) in done:
                        continue
                    scene = data.scene_from_prompt(prompt, np.random.default_rng(seed))
                    row = _score(REFERENCE, frames, prompt, seed, data.render(scene, frames, size), 0.0, fps)
                    rows.append(row)
                    _append(csv_path, row)
    write_report(rows, out_dir)
    return rows


def add_arguments(parser) -> None:
    """Options of ``jaxlongvid bench shapes`` (for the CLI to register; it then calls :func:`run_from_args`)."""
    parser.add_argument("--model", default="tiny", help="pipeline directory or 'tiny' (default)")
    parser.add_argument("--frames", default="64,128,256", help="comma-separated frame counts")
    parser.add_argument("--methods", default="direct,freenoise,freelong,longdiff,freeloc",
                        help="comma-separated method presets")
    parser.add_argument("--prompts", type=int, default=8, help="number of benchmark prompts (see prompts())")
    parser.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompt list")
    parser.add_argument("--seeds", type=int, default=2, help="sampling seeds per prompt: 0 .. S-1")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--devices", type=int, default=None, help="devices to shard frames over")
    parser.add_argument("--no-reference", action="store_true", help="skip the ground-truth rows")
    parser.add_argument("--out", required=True, help="output directory (a rerun resumes it)")


def run_from_args(args, sample_fn=None) -> int:
    """Run the benchmark from parsed :func:`add_arguments` options; returns an exit code."""
    extra = {} if args.devices is None else {"devices": args.devices}
    run_shapes_bench(args.model, [m for m in args.methods.split(",") if m],
                     [int(f) for f in args.frames.split(",") if f], prompts(args.prompts, args.prompt_seed),
                     range(args.seeds), args.out, steps=args.steps, guidance=args.guidance,
                     reference=not args.no_reference, sample_fn=sample_fn, **extra)
    print(f"wrote {os.path.join(args.out, 'results.csv')}, table.md and plots")
    return 0


def _score(method, frames, prompt, seed, video, seconds, fps) -> dict:
    scores = metrics.all_metrics(video, prompt, fps=fps)
    return {"method": method, "frames": frames, "prompt": prompt, "seed": seed, **scores, "seconds": seconds}


# ---- report -----------------------------------------------------------------------------------------------


def summarise(rows) -> dict:
    """{(method, frames): {metric: (mean, std, count)}}, methods in first-seen order."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["method"], int(row["frames"]))].append(row)
    return {key: {m: (float(np.mean([r[m] for r in group])), float(np.std([r[m] for r in group])), len(group))
                  for m in metrics.METRICS} for key, group in groups.items()}


def markdown_table(rows) -> str:
    summary = summarise(rows)
    methods = list(dict.fromkeys(k[0] for k in summary))
    lines = []
    for frames in sorted({k[1] for k in summary}):
        count = max(v[metrics.METRICS[0]][2] for k, v in summary.items() if k[1] == frames)
        lines += [f"### {frames} frames (mean ± std over {count} videos: prompts x seeds)", "",
                  "| method | " + " | ".join(metrics.METRICS) + " |",
                  "|---|" + "---|" * len(metrics.METRICS)]
        for method in methods:
            if (method, frames) in summary:
                cells = [f"{mean:.2f} ± {std:.2f}" for mean, std, _ in
                         (summary[(method, frames)][m] for m in metrics.METRICS)]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Columns: " + ", ".join(f"{m} = {metrics.NAMES[m]}" for m in metrics.METRICS)
                 + " (0-100, higher is better; definitions in `jaxlongvid.bench.metrics`).")
    return "\n".join(lines) + "\n"


def write_report(rows, out_dir) -> None:
    """Write ``table.md`` and one plot per metric from ``rows``."""
    summary = summarise(rows)
    methods = list(dict.fromkeys(k[0] for k in summary))
    text = markdown_table(rows)
    drawn_by = _plot_all(summary, methods, out_dir)
    if drawn_by == "numpy":
        text += "\nPlots (x: frames, log scale; y: the metric's mean, spanning the data): " + ", ".join(
            f"{m} = rgb{PALETTE[i % len(PALETTE)]}" for i, m in enumerate(methods)) + ".\n"
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(text)


def _plot_all(summary, methods, out_dir) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    for metric in metrics.METRICS:
        series = {}
        for method in methods:
            points = sorted((f, v[metric][0]) for (m, f), v in summary.items() if m == method)
            if points:
                series[method] = np.asarray(points, np.float64)
        path = os.path.join(out_dir, f"{metric}.png")
        if plt is not None:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for method, pts in series.items():
                ax.plot(pts[:, 0], pts[:, 1], marker="o", label=method)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("frames")
            ax.set_ylabel(f"{metric} ({metrics.NAMES[metric]})")
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(path, dpi=120)
            plt.close(fig)
        else:
            import imageio.v3 as iio

            iio.imwrite(path, line_plot_raster(series, [PALETTE[methods.index(m) % len(PALETTE)] for m in series]))
    return "numpy" if plt is None else "matplotlib"


def line_plot_raster(series: dict, colours, width: int = 480, height: int = 320) -> np.ndarray:
    """A bare line plot as ``uint8 [height, width, 3]``: x is log2(frames), y spans the data (10 grey
    gridlines across the y range), one coloured polyline with square markers per series."""
    image = np.full((height, width, 3), 255, np.uint8)
    pad = 20
    all_pts = np.concatenate(list(series.values())) if series else np.zeros((1, 2))
    x = np.log2(np.maximum(all_pts[:, 0], 1.0))
    x_lo, x_hi = x.min() - 0.25, x.max() + 0.25
    y_lo, y_hi = all_pts[:, 1].min() - 1.0, all_pts[:, 1].max() + 1.0
    for k in range(11):
        image[int(pad + k * (height - 2 * pad) / 10), pad:width - pad] = 220
    image[pad:height - pad, pad] = image[height - pad, pad:width - pad] = 0

    def to_pixel(pts):
        px = pad + (np.log2(np.maximum(pts[:, 0], 1.0)) - x_lo) / (x_hi - x_lo) * (width - 2 * pad)
        py = height - pad - (pts[:, 1] - y_lo) / (y_hi - y_lo) * (height - 2 * pad)
        return px, py

    for (method, pts), colour in zip(series.items(), colours):
        px, py = to_pixel(pts)
        for a in range(len(px) - 1):
            t = np.linspace(0.0, 1.0, 400)
            xs = np.rint(px[a] + t * (px[a + 1] - px[a])).astype(int)
            ys = np.rint(py[a] + t * (py[a + 1] - py[a])).astype(int)
            for d in (0, 1):
                image[np.clip(ys + d, 0, height - 1), np.clip(xs, 0, width - 1)] = colour
        for cx, cy in zip(np.rint(px).astype(int), np.rint(py).astype(int)):
            image[max(cy - 3, 0):cy + 4, max(cx - 3, 0):cx + 4] = colour
    return image

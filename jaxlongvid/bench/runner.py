"""ShapesBench runner: sample every (method, frames, prompt, seed), score it, write a CSV, a table and plots.

Outputs in ``out_dir``:
- ``results.csv``: one row per video (method, frames, prompt, seed, the metrics, seconds). Rows are appended
  batch by batch and a rerun skips the rows already there, so a long run resumes across device commands (a
  last line cut short by a killed run is dropped on the next start).
- ``table.md``: per frame count, mean ± std over prompts x seeds per method, columns as in the papers
  (SC, BC, MS, TF, IQ, TA, DD), then issue 17's motion fidelity and overall score (SR, DA, PA, MF, OV).
- ``<metric>.png``: the metric's mean against the number of frames, one line per method (matplotlib when it
  is installed; otherwise a plain raster drawn with NumPy, whose colour legend is written in ``table.md``).
- ``sheets/<method>_<frames>f.png``: a contact sheet (every 8th frame) of the first prompt's video at the
  first seed, per method and length (and for the ground truth), written when that video is sampled.
- ``videos/<method>_<frames>f_p<prompt index>_s<seed>.npy``: every sampled video (``save_videos=True``).
- ``config.json``: the settings of the run, and ``first_call_seconds``: the wall time of the first ``sample``
  call of each method, length and batch shape in a process (``METHOD@FRAMESxPROMPTS``: it includes
  compilation; a batch size that does not divide the prompt count adds a second, smaller shape).

Batching and noise. For each (frames, method, seed) the prompts are cut into chunks of ``batch`` consecutive
prompts of the prompt list (``batch=None``: one chunk of all of them), and chunk ``k`` is ONE call
``sample(pipe, chunk_prompts, seed=chunk_seed(seed, k))`` with ``chunk_seed(seed, k) = seed + 1_000_000 k``.
Prompt ``p`` therefore gets row ``p mod batch`` of the noise ``sample`` draws for the whole chunk from
``jax.random.key(chunk seed)``; with the default single chunk, the rows of seed ``s`` are exactly
``sample(pipe, prompts, seed=s)``. (JAX's partitionable threefry makes that row's initial noise independent of
the chunk's size, but the computed video can still differ in the last grey level between batch sizes, so the
batch size is part of the run's settings: it is recorded in ``config.json``.) A rerun samples again, in full
and with the same composition, every chunk that has a missing row, and keeps only the missing rows: a resumed
run gives the same rows as an uninterrupted one with the same settings.

Scoring runs in a pool of ``workers`` processes (``spawn``: JAX must not be forked) while the device samples
the next batch; rows are written in a fixed order (frames, method, seed, prompt), whatever the pool does.
``seconds`` of a row is its call's wall time divided by the number of prompts in the call (so the rows of the
first call of each method, length and batch shape include compilation). The ``ground-truth`` rows (``reference=True``)
score clips rendered by the data generator for the same prompts and seeds: the ceiling of each metric at each
length.

Methods are preset names or specs ``PRESET:FIELD=VALUE[:FIELD=VALUE...]`` (see :func:`parse_method`), e.g.
``longdiff:num_groups=8:window=4``, named ``longdiff[num_groups=8,window=4]`` in the CSV and the table;
``auto`` (the sampler's choice per length); or methods scheduled over denoising time,
``METHOD~END~METHOD...`` (:func:`parse_time_plan`), named by the spec.

Command line: :func:`add_arguments` and :func:`run_from_args` implement ``jaxlongvid bench shapes --frames
64,128,256 --methods direct,freenoise,... --prompts K --seeds S --out DIR``.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import re
import time
from collections import defaultdict

import numpy as np

from jaxlongvid import video as video_lib
from jaxlongvid.bench import metrics
from jaxlongvid.methods import Method, MethodPlan, parse_method, split_top_level
from jaxlongvid.tiny import data, vocab

REFERENCE = "ground-truth"
FIELDS = ("method", "frames", "prompt", "seed", *metrics.METRICS, "seconds")
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (120, 120, 255))
CHUNK_SEED_STRIDE = 1_000_000  # chunk k of seed s samples with seed s + k * CHUNK_SEED_STRIDE
SHEET_EVERY = 8  # contact sheets show every 8th frame
MAX_DEFAULT_WORKERS = 8


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


# ---- method specs -----------------------------------------------------------------------------------------

def parse_methods(text: str) -> list[Method | MethodPlan]:
    """The ``--methods`` list: specs separated by commas (commas inside parentheses belong to a value)."""
    specs = [s.strip() for s in split_top_level(text, ",") if s.strip()]
    if not specs:
        raise ValueError(f"no methods in {text!r}")
    return [parse_method(s) for s in specs]


def method_label(method) -> str:
    """The method's name in the CSV and the table: a preset's name, the ``PRESET[...]`` of a spec, a probe file's
    name, or ``plan[DEFAULT]`` for an unnamed per-layer plan."""
    if isinstance(method, str):  # "auto"
        return method
    if isinstance(method, MethodPlan):
        return method.name or f"plan[{method.default.name}]"
    return method.name


def _file_stem(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", label).strip("_")


# ---- batching and seeds -----------------------------------------------------------------------------------


def chunk_seed(seed: int, chunk: int) -> int:
    """The ``sample`` seed of chunk ``chunk`` of the prompts at seed ``seed`` (chunk 0: the seed itself)."""
    return seed + chunk * CHUNK_SEED_STRIDE


def chunks_to_sample(missing: set[int], num_prompts: int, batch: int | None) -> list[tuple[int, list[int]]]:
    """``(chunk index, prompt indices)`` of every chunk of ``batch`` consecutive prompts with a missing index.

    A chunk is returned whole, with the prompts already done, so that its noise is the uninterrupted run's.
    """
    size = num_prompts if batch is None else batch
    chunks = [(k, list(range(start, min(start + size, num_prompts))))
              for k, start in enumerate(range(0, num_prompts, size))]
    return [(k, indices) for k, indices in chunks if missing.intersection(indices)]


def default_workers() -> int:
    """Scoring processes: one core is left to the sampler's host work, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores - 1, MAX_DEFAULT_WORKERS))


class _Scorer:
    """Metrics of a list of videos: inline (``workers=1``) or in a pool of spawned processes.

    ``submit`` returns a function that waits for and returns the score dicts in the order of the videos.
    """

    def __init__(self, workers: int, fps: float):
        self.fps = fps
        self.pool = None
        if workers > 1:
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, videos, texts):
        if self.pool is None:
            scores = [metrics.all_metrics(v, t, fps=self.fps) for v, t in zip(videos, texts)]
            return lambda: scores
        futures = [self.pool.submit(metrics.all_metrics, v, t, fps=self.fps) for v, t in zip(videos, texts)]
        return lambda: [f.result() for f in futures]

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


# ---- the CSV ----------------------------------------------------------------------------------------------


def _read_done(path: str, log=print) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, "rb+") as f:  # a run killed while writing leaves a last line without its newline: drop it
        text = f.read()
        if text and not text.endswith(b"\n"):
            keep = text.rfind(b"\n") + 1
            log(f"{path}: dropping an incomplete last line ({len(text) - keep} bytes)")
            f.truncate(keep)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = tuple(reader.fieldnames or ())
    missing = [k for k in FIELDS if k not in header]
    for row in rows:
        row["frames"], row["seed"] = int(row["frames"]), int(row["seed"])
        for key in (*metrics.METRICS, "seconds"):
            row[key] = float(row.get(key, "nan"))
    if missing:  # written before these columns existed: rewrite with every column, NaN for the missing ones
        log(f"{path}: adding the columns {', '.join(missing)} (NaN for the {len(rows)} rows already there)")
        os.replace(path, path + ".old")
        _append(path, rows)
        os.remove(path + ".old")
    return rows


def _append(path: str, rows: list[dict]) -> None:
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows({k: row[k] for k in FIELDS} for row in rows)


def _default_sample():
    import jaxlongvid  # late: the sampler lives in the package root and pulls in the models

    return jaxlongvid.sample


def _write_config(path: str, settings: dict, first_call_seconds: dict) -> None:
    with open(path, "w") as f:
        json.dump({**settings, "first_call_seconds": first_call_seconds}, f, indent=1)


def _previous_config(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def model_digest(pipe) -> str:
    """SHA-256 (first 16 hex digits) of a pipeline's config and weights: which model made a row."""
    import hashlib

    if not hasattr(pipe, "params"):  # a test's stand-in passed with its own sample_fn
        return repr(pipe)
    h = hashlib.sha256(json.dumps(pipe.config.to_dict(), sort_keys=True, default=str).encode())
    import jax

    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(pipe.params), key=lambda x: str(x[0])):
        h.update(str(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()[:16]


def check_resume(previous: dict, run_key: dict, method_values: dict, out_dir: str) -> None:
    """Refuse to resume ``out_dir`` with settings that change a row (model, steps, guidance, precision, devices,
    fps, or a method's fields under the same name): its rows would be mislabelled as this run's."""
    changed = [f"{key}: {previous.get('run_key', {}).get(key)!r} -> {value!r}" for key, value in run_key.items()
               if previous.get("run_key", {}).get(key) != value]
    if "run_key" not in previous:  # written before run keys: its sampler settings are all there is to compare
        old = previous.get("sample_kwargs", {})
        new = run_key["sample_kwargs"]
        changed = [f"sample_kwargs: {old!r} -> {new!r}"] if {k: v for k, v in old.items() if k != "progress"} != new \
            else []
    old_methods = previous.get("method_values", {})
    changed += [f"method {name}: {old_methods[name]} -> {value}" for name, value in method_values.items()
                if name in old_methods and old_methods[name] != value]
    if changed:
        raise ValueError(f"{out_dir} holds rows made with other settings ({'; '.join(changed)}); resuming would "
                         f"mislabel them: use another --out, or the same settings to resume")


def _check_batch(videos, count: int, frames: int) -> np.ndarray:
    videos = np.asarray(videos)
    if videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[:2] != (count, frames) or videos.shape[-1] != 3:
        raise ValueError(f"sample returned {videos.dtype} {videos.shape} for {count} prompts of {frames} frames; "
                         "expected uint8 [prompts, frames, height, width, 3]")
    return videos


# ---- the run ----------------------------------------------------------------------------------------------


def run_shapes_bench(pipe, methods, frames_list, prompts, seeds, out_dir, steps=None, guidance=None, *,
                     fps: float = 8.0, reference: bool = True, reference_size: int | None = None,
                     batch: int | None = None, workers: int | None = None, time_budget: float | None = None,
                     sample_fn=None, save_videos: bool = False, log=print, **sample_kwargs) -> list[dict]:
    """Sample and score every (method, frames, prompt, seed); write the outputs listed in the module doc.

    ``pipe``: a loaded pipeline, or a name / directory for ``jaxlongvid.load``. ``methods``: preset names,
    specs (:func:`parse_method`) or Method values. ``steps`` / ``guidance``: ``num_inference_steps`` /
    ``guidance_scale`` (None: the pipeline's defaults). ``batch``: prompts per ``sample`` call (None: all).
    ``workers``: scoring processes (None: :func:`default_workers`; 1: inline). ``time_budget``: seconds after
    which no new batch starts when the longest batch so far would not fit (the report is still written; a
    rerun resumes). ``reference_size``: side of the ground-truth clips (None: that of the sampled videos, or 32
    if every sampled row was resumed from the CSV). ``sample_fn`` replaces ``jaxlongvid.sample`` (same
    signature; it gets a list of prompts and returns ``[prompts, frames, H, W, 3]``). Extra keyword arguments
    go to the sampler. Returns all rows, including those of earlier runs found in the CSV.
    """
    started = time.perf_counter()
    frames_list, prompts, seeds = [int(f) for f in frames_list], list(prompts), [int(s) for s in seeds]
    methods = [parse_method(m) for m in methods]
    if not (methods and frames_list and prompts and seeds):
        raise ValueError("methods, frames_list, prompts and seeds must all be non-empty")
    labels = [method_label(m) for m in methods]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated or REFERENCE in labels:
        raise ValueError(f"method names must be distinct and not {REFERENCE!r}: {repeated or [REFERENCE]}")
    if len(set(prompts)) != len(prompts):
        raise ValueError("prompts must be distinct")
    bad_seeds = [s for s in seeds if not 0 <= s < CHUNK_SEED_STRIDE]
    if bad_seeds:
        raise ValueError(f"seeds must be in [0, {CHUNK_SEED_STRIDE}), got {bad_seeds}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be a positive integer or None, got {batch!r}")
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
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
    config_path = os.path.join(out_dir, "config.json")
    rows = _read_done(csv_path, log)
    done = {(r["method"], r["frames"], r["prompt"], r["seed"]) for r in rows}
    batch_size = len(prompts) if batch is None else min(batch, len(prompts))
    previous = _previous_config(config_path)
    run_key = {"model": model_digest(pipe), "fps": fps,
               "sample_kwargs": {k: repr(v) for k, v in sorted(sample_kwargs.items()) if k != "progress"}}
    method_values = {name: repr(m) for name, m in zip(labels, methods)}
    if rows:
        check_resume(previous, run_key, method_values, out_dir)
    if previous.get("batch", batch_size) != batch_size:
        log(f"warning: {config_path} was written with batch {previous['batch']}, this run uses {batch_size}: "
            "the rows still to do get the noise of the new chunks")
    method_values = {**previous.get("method_values", {}), **method_values}  # rows of earlier methods stay valid
    settings = {"run_key": run_key, "methods": labels, "method_values": method_values,
                "frames": frames_list, "prompts": prompts, "seeds": seeds, "fps": fps, "reference": reference,
                "batch": batch_size, "chunk_seed": f"seed + {CHUNK_SEED_STRIDE} * chunk index", "workers": workers,
                "sample_kwargs": {k: repr(v) for k, v in sample_kwargs.items()}}
    first_call_seconds = dict(previous.get("first_call_seconds", {}))
    _write_config(config_path, settings, first_call_seconds)
    expected = {(label, frames, p, seed) for label in labels + ([REFERENCE] if reference else [])
                for frames in frames_list for p in prompts for seed in seeds}
    sheets_dir, videos_dir = os.path.join(out_dir, "sheets"), os.path.join(out_dir, "videos")

    def finish(job):
        """Wait for a batch's scores, write its rows, print its progress line."""
        info, wait = job
        new = [{"method": info["label"], "frames": info["frames"], "prompt": prompts[i], "seed": info["seed"],
                **scores, "seconds": info["per_row"]} for i, scores in zip(info["indices"], wait())]
        rows.extend(new)
        _append(csv_path, new)
        done.update((r["method"], r["frames"], r["prompt"], r["seed"]) for r in new)
        means = " ".join(f"{m} {np.mean([r[m] for r in new]):.1f}" for m in metrics.METRICS)
        made = (f"{info['count']} clips rendered" if info["label"] == REFERENCE else
                f"{info['count']} videos in {info['seconds']:.1f} s ({info['per_row']:.2f} s/video"
                f"{', incl. compilation' if info['first'] else ''})")
        log(f"[{len(done & expected)}/{len(expected)}] {info['label']} {info['frames']}f seed {info['seed']} "
            f"chunk {info['chunk']}: {made}, {len(new)} new rows; {means}")

    tasks = []  # (frames, method or None for the ground truth, label, seed, chunk, prompt indices, missing)
    for frames in frames_list:
        for method, label in zip(methods, labels):
            for seed in seeds:
                missing = {i for i, p in enumerate(prompts) if (label, frames, p, seed) not in done}
                tasks += [(frames, method, label, seed, chunk, indices, missing)
                          for chunk, indices in chunks_to_sample(missing, len(prompts), batch_size)]
        for seed in seeds if reference else ():
            missing = {i for i, p in enumerate(prompts) if (REFERENCE, frames, p, seed) not in done}
            if missing:
                tasks.append((frames, None, REFERENCE, seed, 0, sorted(missing), missing))

    size, pending, longest, stopped, timed = reference_size, None, 0.0, False, set()
    scorer = _Scorer(workers, fps)
    try:
        for frames, method, label, seed, chunk, indices, missing in tasks:
            start = time.perf_counter()
            if method is None:  # the ground truth: rendered, not sampled
                size = size or 32
                videos = [data.render(data.scene_from_prompt(prompts[i], np.random.default_rng(seed)), frames, size)
                          for i in indices]
                seconds, first = 0.0, False
            else:
                if time_budget is not None and start - started + longest > time_budget:
                    stopped = True
                    break
                videos = sample_fn(pipe, [prompts[i] for i in indices], num_frames=frames, method=method,
                                   seed=chunk_seed(seed, chunk), **sample_kwargs)
                videos = _check_batch(videos, len(indices), frames)
                seconds = time.perf_counter() - start
                size = size or int(min(videos.shape[2:4]))
                shape = f"{label}@{frames}x{len(indices)}"  # a new batch shape compiles its programs
                first = shape not in timed
                if first:
                    timed.add(shape)
                    first_call_seconds[shape] = round(seconds, 3)
                    _write_config(config_path, settings, first_call_seconds)
            kept = [j for j, i in enumerate(indices) if i in missing]
            for j in kept:
                if indices[j] == 0 and seed == seeds[0]:
                    _save_sheet(videos[j], sheets_dir, label, frames)
                if save_videos and method is not None:
                    os.makedirs(videos_dir, exist_ok=True)
                    np.save(os.path.join(videos_dir, f"{_file_stem(label)}_{frames}f_p{indices[j]}_s{seed}.npy"),
                            videos[j])
            info = {"label": label, "frames": frames, "seed": seed, "chunk": chunk, "count": len(indices),
                    "indices": [indices[j] for j in kept], "seconds": seconds, "per_row": seconds / len(indices),
                    "first": first}
            job = (info, scorer.submit([videos[j] for j in kept], [prompts[indices[j]] for j in kept]))
            if pending is not None:
                finish(pending)  # the previous batch was scored while this one was made
            pending = job
            longest = max(longest, time.perf_counter() - start)
    finally:
        try:
            if pending is not None:
                finish(pending)
        finally:
            scorer.close()
    left = len(expected - done)
    elapsed = time.perf_counter() - started
    if stopped:
        log(f"time budget of {time_budget:.0f} s reached after {elapsed:.0f} s: {left} of {len(expected)} rows "
            "left; run the same command again to resume")
    else:
        log(f"done in {elapsed:.0f} s: {len(expected) - left} of {len(expected)} rows")
    write_report(rows, out_dir)
    return rows


def _save_sheet(clip, sheets_dir, label, frames) -> None:
    os.makedirs(sheets_dir, exist_ok=True)
    video_lib.save_contact_sheet(clip, os.path.join(sheets_dir, f"{_file_stem(label)}_{frames}f.png"),
                                 every=SHEET_EVERY)


def add_arguments(parser) -> None:
    """Options of ``jaxlongvid bench shapes`` (for the CLI to register; it then calls :func:`run_from_args`)."""
    parser.add_argument("--model", default="tiny", help="pipeline directory or 'tiny' (default)")
    parser.add_argument("--frames", default="64,128,256", help="comma-separated frame counts")
    parser.add_argument("--methods", default="direct,freenoise,freelong,longdiff,freeloc",
                        help="comma-separated methods: preset names, or PRESET:FIELD=VALUE[:FIELD=VALUE...] to "
                             "override Method fields (Python literals; commas inside parentheses stay with the "
                             "value), e.g. 'longdiff:num_groups=8:window=4,freeloc:w1=12:w2=16'; "
                             "such a variant is named longdiff[num_groups=8,window=4] in the results")
    parser.add_argument("--prompts", type=int, default=8, help="number of benchmark prompts (see prompts())")
    parser.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompt list")
    parser.add_argument("--motions", default=",".join(vocab.MOVING_MOTIONS),
                        help=f"comma-separated motions the prompts draw from, of {', '.join(vocab.MOTIONS)} "
                             "(default: every moving one; bouncing,circling: the laws that stay in frame)")
    parser.add_argument("--seeds", type=int, default=2, help="sampling seeds per prompt: 0 .. S-1")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--devices", type=int, default=None, help="devices to shard frames over")
    parser.add_argument("--precision", default=None, choices=("default", "high", "highest"),
                        help="matmul precision of the sampler (default: the sampler's own default)")
    parser.add_argument("--batch", type=int, default=None,
                        help="prompts per sample call (default: all); chunk k of seed s samples with seed "
                             f"s + {CHUNK_SEED_STRIDE} k, so the batch size is part of the run's settings")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"processes scoring the videos (default: CPU cores - 1, at most "
                             f"{MAX_DEFAULT_WORKERS}; 1: score inline)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: start no batch that would end past it (judged by the longest batch so "
                             "far), then write the report; run the command again to resume")
    parser.add_argument("--save-videos", action="store_true", help="also write videos/*.npy, one per video")
    parser.add_argument("--no-reference", action="store_true", help="skip the ground-truth rows")
    parser.add_argument("--out", required=True, help="output directory (a rerun resumes it)")


def run_from_args(args, sample_fn=None) -> int:
    """Run the benchmark from parsed :func:`add_arguments` options; returns an exit code."""
    extra = {name: getattr(args, name) for name in ("devices", "precision") if getattr(args, name) is not None}
    motions = [m.strip() for m in args.motions.split(",") if m.strip()]
    run_shapes_bench(args.model, parse_methods(args.methods), [int(f) for f in args.frames.split(",") if f],
                     prompts(args.prompts, args.prompt_seed, motions), range(args.seeds), args.out,
                     steps=args.steps, guidance=args.guidance, reference=not args.no_reference, batch=args.batch,
                     workers=args.workers, time_budget=args.time_budget, save_videos=args.save_videos,
                     sample_fn=sample_fn, **extra)
    print(f"wrote {os.path.join(args.out, 'results.csv')}, table.md and plots")
    return 0


# ---- report -----------------------------------------------------------------------------------------------


def summarise(rows) -> dict:
    """{(method, frames): {metric: (mean, std, count)}}, methods in first-seen order."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["method"], int(row["frames"]))].append(row)
    return {key: {m: (float(np.mean([r[m] for r in group])), float(np.std([r[m] for r in group])), len(group))
                  for m in metrics.METRICS} for key, group in groups.items()}


def law_group(prompt: str) -> str:
    """"linear" when an object of the prompt follows a law that wraps round the frame in a long ground-truth clip
    (left, right, up, down), else "in-frame" (bouncing, circling, still): a long video can follow those at their
    speed with the object whole (docs/motion.md, "What the linear laws ask for")."""
    laws = {obj.motion for obj in data.parse_prompt(prompt).objects}
    return "linear" if laws & set(vocab.LINEAR_MOTIONS) else "in-frame"


def markdown_table(rows) -> str:
    """One table per frame count over every video, then, where both law groups occur, one per group."""
    lines = summary_tables(rows, "")
    groups = {law_group(r["prompt"]) for r in rows}
    if len(groups) > 1:
        for group in ("in-frame", "linear"):
            lines += summary_tables([r for r in rows if law_group(r["prompt"]) == group], f", {group} laws")
    lines.append("Columns: " + ", ".join(f"{m} = {metrics.NAMES[m]}" for m in metrics.METRICS)
                 + " (0-100, higher is better; definitions in `jaxlongvid.bench.metrics`).")
    return "\n".join(lines) + "\n"


def summary_tables(rows, what: str) -> list[str]:
    summary = summarise(rows)
    methods = list(dict.fromkeys(k[0] for k in summary))
    lines = []
    for frames in sorted({k[1] for k in summary}):
        count = max(v[metrics.METRICS[0]][2] for k, v in summary.items() if k[1] == frames)
        lines += [f"### {frames} frames{what} (mean ± std over {count} videos: prompts x seeds)", "",
                  "| method | " + " | ".join(metrics.METRICS) + " |",
                  "|---|" + "---|" * len(metrics.METRICS)]
        for method in methods:
            if (method, frames) in summary:
                cells = [f"{mean:.2f} ± {std:.2f}" for mean, std, _ in
                         (summary[(method, frames)][m] for m in metrics.METRICS)]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


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
            points = sorted((f, v[metric][0]) for (m, f), v in summary.items()
                            if m == method and not np.isnan(v[metric][0]))  # NaN: rows from before a metric
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

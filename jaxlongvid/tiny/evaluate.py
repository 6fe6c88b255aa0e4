"""Evaluation of the bundled tiny model against issue 5's criterion, and the digest of its weights.

    python -m jaxlongvid.tiny.evaluate --prompts 50 --frames 16 [--seed S] [--out DIR] [--steps 25]
        [--guidance G | --guidance-sweep 1.5,3,5] [--batch 10] [--sheet-rows 10] [--long-frames 128]

One clip per benchmark prompt (:func:`jaxlongvid.bench.runner.prompts`: single-object prompts with balanced
colours, shapes, motions and backgrounds), sampled in batches of prompts, each judged by
:func:`jaxlongvid.bench.detect.matches_prompt`. A clip passes *colour and shape* when its prompted colour and
its prompted shape are each seen in at least 90% of its frames, *motion* when its detected motion is the
prompted kind, and *all* when both hold. Issue 5's criterion: at least 90% of the clips pass all.

Seeds: batch ``k`` (0-based) of a run with ``--seed S`` samples with seed ``1000 S + k``, so a run is
reproducible given its batch size (which changes which noise each prompt gets).

Outputs in ``--out``: ``report.md`` (the numbers and per-attribute tables), ``results.json`` (settings, summary
and one row per clip), ``samples.png`` (the first ``--sheet-rows`` clips: one row per clip, one column per
frame) and ``long_direct.png`` (one naive ``method="direct"`` clip of ``--long-frames`` frames, every 8th frame).
With ``--guidance-sweep`` the same prompts and seeds are sampled at each scale and a comparison table is
written (``sweep.md``); the sheets are drawn for the first scale.

:func:`weights_digest` is the SHA-256 quoted in the model card (MODEL_CARD.md) for the shipped weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import numpy as np

from jaxlongvid.bench import detect, runner
from jaxlongvid.tiny import data

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
PARAMS_DIR = os.path.join(WEIGHTS_DIR, "params")
CRITERION = 0.9  # issue 5: this fraction of clips must pass all
LONG_PROMPT = "a red circle moving right on a black background"
LONG_SHEET_EVERY = 8
_CHUNK = 1 << 20


# ---- weights digest ---------------------------------------------------------------------------------------------
def weights_digest(path: str = PARAMS_DIR) -> str:
    """SHA-256 (hex) over every file under ``path``, in order of relative path ('/'-separated).

    Each file contributes its relative path, a NUL byte, its size in decimal, a NUL byte and its bytes, so a
    renamed, moved, added or removed file changes the digest as well as changed contents.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"weights_digest: {path} is not a directory")
    files = []
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            files.append((os.path.relpath(full, path).replace(os.sep, "/"), full))
    if not files:
        raise ValueError(f"weights_digest: {path} holds no files")
    digest = hashlib.sha256()
    for rel, full in sorted(files):
        digest.update(rel.encode() + b"\0" + str(os.path.getsize(full)).encode() + b"\0")
        with open(full, "rb") as f:
            for block in iter(lambda: f.read(_CHUNK), b""):
                digest.update(block)
    return digest.hexdigest()


# ---- sampling and judging ---------------------------------------------------------------------------------------
def batch_seed(seed: int, index: int) -> int:
    """The sampling seed of batch ``index`` of a run with seed ``seed`` (see the module notes)."""
    return 1000 * int(seed) + int(index)


def sample_clips(pipe, prompts, frames: int, seed: int = 0, batch: int = 10, steps=None, guidance=None,
                 log=print) -> tuple[np.ndarray, float]:
    """uint8 clips ``[len(prompts), frames, H, W, 3]`` sampled ``batch`` prompts per call, and the seconds spent
    (the first call includes compilation; a last, smaller batch compiles again)."""
    import jaxlongvid

    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    prompts = list(prompts)
    clips, start = [], time.perf_counter()
    for k in range(0, len(prompts), batch):
        t0 = time.perf_counter()
        part = jaxlongvid.sample(pipe, prompts[k:k + batch], num_frames=frames, seed=batch_seed(seed, k // batch),
                                 num_inference_steps=steps, guidance_scale=guidance, progress=False)
        clips.append(np.asarray(part))
        log(f"  batch {k // batch}: {len(part)} clips in {time.perf_counter() - t0:.1f} s")
    return np.concatenate(clips), time.perf_counter() - start


def judge(clips, prompts) -> list[dict]:
    """One row per clip: the prompt's attributes and :func:`detect.matches_prompt`'s verdicts."""
    rows = []
    for clip, prompt in zip(clips, prompts):
        spec = data.parse_prompt(prompt)
        if len(spec.objects) != 1:
            raise ValueError(f"the evaluation uses single-object prompts, got {prompt!r}")
        obj = spec.objects[0]
        m = detect.matches_prompt(clip, spec)
        rows.append({
            "prompt": prompt, "colour": obj.colour, "shape": obj.shape, "motion": obj.motion,
            "background": spec.background,
            "colour_fraction": m["colour_ok_fraction"], "shape_fraction": m["shape_ok_fraction"],
            "detected_motion": m["objects"][0]["motion"],
            "colour_shape_ok": bool(m["colour_ok_fraction"] >= detect.MATCH_FRACTION
                                    and m["shape_ok_fraction"] >= detect.MATCH_FRACTION),
            "motion_ok": bool(m["motion_ok"]), "ok": bool(m["ok"]),
            "background_ok": m["background_ok"],
        })
    return rows


def _rates(rows) -> dict:
    n = len(rows)
    return {"n": n,
            "colour_shape": sum(r["colour_shape_ok"] for r in rows) / n,
            "motion": sum(r["motion_ok"] for r in rows) / n,
            "all": sum(r["ok"] for r in rows) / n,
            "colour_frames": float(np.mean([r["colour_fraction"] for r in rows])),
            "shape_frames": float(np.mean([r["shape_fraction"] for r in rows]))}


def summarise(rows) -> dict:
    """Pass rates over all clips and per value of each prompted attribute (colour, shape, motion, background).

    ``colour_shape``, ``motion``, ``all``: fractions of clips passing; ``colour_frames`` / ``shape_frames``: the
    mean fraction of frames showing the prompted colour / shape. ``criterion_met``: ``all >= 0.9``.
    """
    if not rows:
        raise ValueError("no rows to summarise")
    summary = {"overall": _rates(rows), "by": {}}
    for attribute in ("colour", "shape", "motion", "background"):
        values = list(dict.fromkeys(r[attribute] for r in rows))
        summary["by"][attribute] = {str(v): _rates([r for r in rows if r[attribute] == v]) for v in values}
    summary["criterion_met"] = summary["overall"]["all"] >= CRITERION
    confusion = {}
    for r in rows:
        confusion.setdefault(r["motion"], {}).setdefault(r["detected_motion"], 0)
        confusion[r["motion"]][r["detected_motion"]] += 1
    summary["detected_motion"] = confusion
    return summary


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def report_markdown(summary: dict, settings: dict) -> str:
    o = summary["overall"]
    lines = [f"Settings: {', '.join(f'{k}={v}' for k, v in settings.items())}", "",
             f"- colour and shape in >= 90% of frames: {_pct(o['colour_shape'])} of {o['n']} clips",
             f"- prompted motion: {_pct(o['motion'])}",
             f"- all (issue 5): {_pct(o['all'])} (criterion: >= {_pct(CRITERION)}; "
             f"{'met' if summary['criterion_met'] else 'NOT met'})",
             f"- mean fraction of frames with the prompted colour: {_pct(o['colour_frames'])}, "
             f"with the prompted shape: {_pct(o['shape_frames'])}", ""]
    for attribute, table in summary["by"].items():
        lines += [f"| {attribute} | clips | colour+shape | motion | all | colour frames | shape frames |",
                  "|---|---|---|---|---|---|---|"]
        for value, r in table.items():
            lines.append(f"| {value} | {r['n']} | {_pct(r['colour_shape'])} | {_pct(r['motion'])} | "
                         f"{_pct(r['all'])} | {_pct(r['colour_frames'])} | {_pct(r['shape_frames'])} |")
        lines.append("")
    lines.append("Detected motion per prompted motion: " + "; ".join(
        f"{m}: " + ", ".join(f"{d} {n}" for d, n in sorted(c.items(), key=lambda kv: -kv[1]))
        for m, c in summary["detected_motion"].items()))
    return "\n".join(lines) + "\n"


# ---- contact sheets ---------------------------------------------------------------------------------------------
def clips_sheet(clips, every: int = 1, gap: int = 2, scale: int = 1) -> np.ndarray:
    """uint8 image: one row per clip, frames ``0, every, ...`` across, ``gap`` white pixels between tiles,
    each pixel repeated ``scale`` times."""
    from jaxlongvid import video

    clips = np.asarray(clips)
    if clips.ndim != 5:
        raise ValueError(f"clips must be [clips, frames, H, W, 3], got shape {clips.shape}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    clips = np.repeat(np.repeat(clips, scale, axis=2), scale, axis=3)
    rows = [video.contact_sheet(c, every=every, columns=len(c[::every]), gap=gap) for c in clips]
    spacer = np.full((gap, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([part for row in rows for part in (row, spacer)][:-1])


def write_png(image: np.ndarray, path: str) -> str:
    import imageio.v3 as iio

    iio.imwrite(path, image, extension=".png")
    return path


# ---- the run ----------------------------------------------------------------------------------------------------
def evaluate(pipe, prompts, frames: int = 16, seed: int = 0, batch: int = 10, steps=None, guidance=None,
             log=print) -> dict:
    """Sample and judge one clip per prompt; returns ``{"clips", "rows", "summary", "seconds"}``."""
    clips, seconds = sample_clips(pipe, prompts, frames, seed, batch, steps, guidance, log)
    rows = judge(clips, prompts)
    return {"clips": clips, "rows": rows, "summary": summarise(rows), "seconds": seconds}


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jaxlongvid.tiny.evaluate",
                                 description="Evaluate the tiny model against issue 5's criterion.")
    ap.add_argument("--model", default="tiny", help="pipeline directory, 'tiny' (default) or 'tiny-dit'")
    ap.add_argument("--prompts", type=int, default=50, help="number of benchmark prompts (default 50)")
    ap.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompt list (runner.prompts)")
    ap.add_argument("--frames", type=int, default=16, help="frames per clip (default 16, the native length)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (batch k uses 1000 seed + k)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    ap.add_argument("--guidance-sweep", type=_floats, default=None,
                    help="comma-separated guidance scales to compare on the same prompts and seeds")
    ap.add_argument("--batch", type=int, default=10, help="prompts per sample call (default 10)")
    ap.add_argument("--sheet-rows", type=int, default=10, help="clips on samples.png (0: none)")
    ap.add_argument("--long-frames", type=int, default=128,
                    help="frames of the naive direct sample on long_direct.png (0: skip it)")
    ap.add_argument("--scale", type=int, default=2, help="pixel repeat of the contact sheets")
    ap.add_argument("--out", default="tiny_eval", help="output directory (default tiny_eval)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("prompts", "frames", "batch"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.guidance is not None and args.guidance_sweep is not None:
        raise SystemExit("give --guidance or --guidance-sweep, not both")
    import jaxlongvid
    from jaxlongvid import pipeline

    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    pipe = jaxlongvid.load(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s")
    prompts = runner.prompts(args.prompts, args.prompt_seed)
    steps = args.steps if args.steps is not None else pipe.config.num_inference_steps
    scales = args.guidance_sweep or [args.guidance if args.guidance is not None else pipe.config.guidance_scale]
    results, sweep_lines = [], []
    for scale in scales:
        settings = {"model": args.model, "prompts": args.prompts, "prompt_seed": args.prompt_seed,
                    "frames": args.frames, "seed": args.seed, "steps": steps, "guidance": scale,
                    "batch": args.batch, "sampler": pipe.config.scheduler.kind}
        print(f"guidance {scale}: sampling {len(prompts)} clips of {args.frames} frames, {steps} steps")
        result = evaluate(pipe, prompts, args.frames, args.seed, args.batch, steps, scale)
        o = result["summary"]["overall"]
        print(f"guidance {scale}: colour+shape {_pct(o['colour_shape'])}, motion {_pct(o['motion'])}, "
              f"all {_pct(o['all'])} of {o['n']} ({result['seconds']:.1f} s sampling)")
        results.append((settings, result))
        sweep_lines.append(f"| {scale} | {_pct(o['colour_shape'])} | {_pct(o['motion'])} | {_pct(o['all'])} | "
                           f"{_pct(o['colour_frames'])} | {_pct(o['shape_frames'])} | {result['seconds']:.0f} |")

    text = []
    for settings, result in results:
        text += [f"## guidance {settings['guidance']}", "",
                 report_markdown(result["summary"], settings),
                 f"Sampling time: {result['seconds']:.1f} s (compilation included)", ""]
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(text))
    if len(results) > 1:
        header = ["| guidance | colour+shape | motion | all | colour frames | shape frames | seconds |",
                  "|---|---|---|---|---|---|---|"]
        with open(os.path.join(args.out, "sweep.md"), "w") as f:
            f.write("\n".join(header + sweep_lines) + "\n")
        print("\n".join(header + sweep_lines))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump([{"settings": s, "summary": r["summary"], "seconds": r["seconds"], "rows": r["rows"]}
                   for s, r in results], f, indent=1)

    first_settings, first = results[0]
    if args.sheet_rows > 0:
        path = write_png(clips_sheet(first["clips"][:args.sheet_rows], scale=args.scale),
                         os.path.join(args.out, "samples.png"))
        print(f"wrote {path}")
    if args.long_frames > 0:
        t1 = time.perf_counter()
        long_clip = jaxlongvid.sample(pipe, LONG_PROMPT, num_frames=args.long_frames, method="direct",
                                      seed=args.seed, num_inference_steps=steps,
                                      guidance_scale=first_settings["guidance"], progress=False)
        seconds = time.perf_counter() - t1
        path = write_png(clips_sheet(np.asarray(long_clip)[None], every=LONG_SHEET_EVERY, scale=args.scale),
                         os.path.join(args.out, "long_direct.png"))
        verdict = detect.matches_prompt(np.asarray(long_clip), LONG_PROMPT)
        print(f"wrote {path}: {LONG_PROMPT!r}, {args.long_frames} frames, direct, in {seconds:.1f} s; colour "
              f"{_pct(verdict['colour_ok_fraction'])} shape {_pct(verdict['shape_ok_fraction'])} of frames, "
              f"motion {verdict['objects'][0]['motion']}")
    print(report_markdown(first["summary"], first_settings))
    # the digest of the weights evaluated (the card quotes the shipped one)
    print(f"weights digest: {weights_digest(os.path.join(pipeline.resolve(args.model), pipeline.PARAMS_DIR))}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

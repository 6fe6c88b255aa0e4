"""ShapesBench metrics: model-free analogues of VBench's dimensions for the tiny model's synthetic world.

Each metric is a pure function of a uint8 video ``[F, H, W, 3]`` (and the prompt where it needs it) and returns
a float on a 0-100 scale, higher is better. Objects are found by :mod:`jaxlongvid.bench.detect`. For SC, MS
and DD the "subjects" are the largest objects of the first frame that shows any (as many as the prompt names,
or without a prompt as many as there are dominant colours, at most two), followed frame to frame by position
whatever their colour (:func:`detect.subject_paths`), so a subject that changes colour or shape is still the
same subject and the metric judges the change. TA follows each prompted object by its prompted colour.
``p_t`` is a subject's centroid in frame t (pixels, unwrapped on the torus), ``S`` the frame side (the smaller
of H and W), and a mean over subjects is taken where there are several. A video with no detectable subject
scores 0 on the subject-based metrics (SC, MS, DD): there is nothing to judge.

- **SC, subject consistency** (VBench: DINO features of frames; here the subject itself). Feature ``f_t``: a
  window of side S/2 centred on ``p_t`` (bilinear, sub-pixel, wrapping) of the image ``rgb/255 * chroma/255``
  (chroma is coverage over a grey background, so the background drops out and colour, shape and pattern
  stay), or zero when the subject is missing. As VBench, with ``c = max(0, cos)``:
  ``SC = 100 * mean_{t>=1} (c(f_t, f_{t-1}) + c(f_t, f_0)) / 2``.
- **BC, background consistency** (VBench: the same formula on CLIP features of whole frames). Background of a
  frame: pixels more than two pixels away from any pixel with chroma >= 64 (an object). For frames a, b, over
  the pixels that are background in both: ``s(a, b) = 1 - mean |I_a - I_b| / 255`` (0 when there are none).
  ``BC = 100 * mean_{t>=1} (s(t, t-1) + s(t, 0)) / 2``.
- **MS, motion smoothness** (VBench: frames interpolated by a VFI network from their neighbours, compared to
  the real ones). Here the interpolation is the midpoint of the neighbours' positions, which is exact for
  uniform motion: ``e_t = |p_t - (p_{t-1} + p_{t+1}) / 2| / (S / 4)``, 1 when any of the three is missing;
  ``MS = 100 * (1 - mean_t min(1, e_t))``. A stutter (repeated frames) costs its speed, a jump costs up to
  S / 4; circling at the slowest turn costs under 1 point.
- **TF, temporal flickering**: VBench's own (model-free) definition, unchanged:
  ``TF = 100 * (1 - mean_t mean |I_{t+1} - I_t| / 255)`` over all pixels and channels.
- **IQ, imaging quality / detail** (VBench: MUSIQ, which judges sharpness and noise). Two model-free factors.
  Sharpness: at every strong edge of the chroma image (a local maximum of the central difference g along its
  dominant axis, |g| >= 24 grey levels per pixel) the edge width is ``|c(x+2) - c(x-2)| / |g(x)|`` (contrast
  over the peak slope, as Marziliano's width; 2 for any edge whose transition lies within one pixel, whatever
  its contrast and sub-pixel phase); with ``w`` the mean over all edges of the video,
  ``sharp = clip((w_blur - w) / (w_blur - 2), 0, 1)``, where ``w_blur`` is the width of the generator's edge
  after a Gaussian blur of sigma = S / 32 pixels (both computed with the same operator). Object outlines and
  the checkered pattern's cells are such edges, so blur and lost detail both show. Noise: sigma from
  Immerkaer's operator on the luma (robust median form); ``clean = clip(1 - sigma / 20, 0, 1)``.
  ``IQ = 100 * sharp * clean``; 0 when the video has no strong chroma edge.
- **TA, text alignment** (VBench: overall consistency, ViCLIP; plus its color and object-class dimensions).
  Per prompted object: the fraction of frames where its colour is present, the fraction where the detected
  shape is the prompted one, and the fraction of motion windows (16 frames, stride 8; the whole clip when
  shorter than 32 frames) whose detected motion is the prompted one (1 if the prompt names none);
  ``TA = 100 * mean over objects of the mean of the three``.
- **DD, dynamic degree**: VBench's rule with the subject's displacement in place of the top-5% RAFT flow (the
  subject is about 5-10% of the frame, so its displacement is what those pixels' flow measures). For video at
  ``fps`` frames per second, a frame pair moves when the largest subject displacement exceeds
  ``6 * max(1, 8 / fps) * S / 256`` pixels; the video is dynamic (100) when at least ``round(4 F / 16)`` pairs
  move, else 0. As in VBench the per-video value is 0 or 100 and a table reports the mean over videos.

Motion fidelity (issue 17; no VBench analogue: VBench has no ground-truth motion). The prompt names a motion
law of the data generator (:mod:`jaxlongvid.tiny.data`); the prompted object is followed by its colour (as for
TA), its centroids unwrapped on the torus (gaps filled linearly) give the path ``p_t``, and
``d_t = p_{t+k} - p_t`` with ``k = 4`` frames is its displacement (longer than one frame so that sub-pixel
tracking noise does not count as motion). The law's own values are the same statistics computed on the exact
trajectories of 256 random objects of the prompted motion and shape (drawn as for the 16-frame training clips,
evaluated at the video's length): its range ``[lo, hi]``. An object present in under half the frames scores 0
on all three (no path to judge); a prompt that names no motion gives NaN.
- **SR, speed ratio**: speed ``s = mean_t |d_t| / k``; ``r`` = s over the law's range: ``SR = 100`` when
  ``lo <= s <= hi``, else ``100 * min(s / lo, hi / s)`` (2x slower than the slowest instance of the law: 50).
  For ``still``: ``SR = 100 * max(0, 1 - s / slowest moving law speed)``.
- **DA, direction agreement**, per law: ``left/right/up/down``: the share of the travelled path that goes the
  prompted way, ``max(0, sum_t d_t . u) / sum_t |d_t|`` (u the prompted unit direction; a reversed clip gets
  0, jitter about 0); ``circling`` (either way round): ``|sum_t a_t| / sum_t |a_t|`` with ``a_t`` the signed
  angle from ``d_t`` to ``d_{t+1}`` (a steady turn is 1, a straight path or jitter about 0); ``bouncing``
  (both axes at comparable speeds): ``q = sum_t min(|d_x|, |d_y|) / sum_t max(|d_x|, |d_y|)``,
  ``DA = min(1, q / lo_q)``. ``still``: 100.
- **PA, path accuracy** (100 - path error): RMS distance ``e`` of the path from the law's shape, in units of
  a tenth of the side, ``PA = 100 * (1 - min(1, e / (S / 10)))``: ``left/right/up/down``: the path's
  sideways coordinate (across u) from its mean; ``circling``: the radial residual of a least-squares circle
  (Kasa's algebraic fit); ``bouncing``: the distance of the unwrapped path outside the frame (a bouncing
  centre never wraps); ``still``: the distance from the mean position.
- **MF, motion fidelity**: ``(SR * DA * PA)^(1/3)``, mean over prompted objects with a motion.
- **OV, overall**: ``(SC * TA * MF)^(1/3)``: a still video (SR, MF ~ 0) or one that loses its subject
  (SC, TA low) cannot score high.

Validation (``tests/test_bench_metrics.py``): on clean renders of the data generator (32 px, 16 and 128
frames) every metric scores near the top (SC >= 98.6, BC = 100, MS >= 96.3, TF >= 96.9, IQ >= 95.8, TA = 100,
DD = 100 for moving objects); clip by clip, shuffled frames lower MS (by >= 45), a stutter lowers MS (>= 11),
frozen frames set DD to 0, blur lowers IQ (>= 93), noise lowers TF, BC and IQ (>= 4, 4, 32), a colour drift
lowers SC and TA (>= 5.7, 70), an object swap lowers SC and TA (>= 9, 33), a background switch lowers BC (>= 5);
the metrics a corruption should not see move by under 3 points.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from jaxlongvid.bench import detect
from jaxlongvid.tiny import data
from jaxlongvid.tiny.data import PromptSpec, parse_prompt

METRICS = ("SC", "BC", "MS", "TF", "IQ", "TA", "DD", "SR", "DA", "PA", "MF", "OV")
NAMES = {"SC": "subject consistency", "BC": "background consistency", "MS": "motion smoothness",
         "TF": "temporal flickering", "IQ": "imaging quality", "TA": "text alignment", "DD": "dynamic degree",
         "SR": "speed ratio", "DA": "direction agreement", "PA": "path accuracy", "MF": "motion fidelity",
         "OV": "overall"}

EDGE_GRADIENT_MIN = 24.0  # IQ: chroma edges weaker than this (per pixel) are not judged
NOISE_LIMIT = 20.0  # IQ: luma noise (grey levels) at which the clean factor reaches 0
MOTION_LAG = 4  # motion fidelity: frames between the positions of a displacement d_t
LAW_DRAWS = 256  # motion fidelity: random objects whose statistics give a law's range
PATH_TOLERANCE = 0.1  # PA: RMS path error (fraction of the side) at which PA reaches 0


def _side(video) -> int:
    return int(min(video.shape[1:3]))


def _spec(prompt):
    if prompt is None or isinstance(prompt, PromptSpec):
        return prompt
    return parse_prompt(prompt)


def _mean_over(values) -> float:
    return float(np.mean(values)) if len(values) else 0.0


def _subject_paths(video, spec) -> list[np.ndarray]:
    """Subjects for SC, MS and DD, followed whatever their colour (detect.subject_paths): as many as the
    prompt names objects, or as many as there are dominant colours (1 or 2) without a prompt."""
    count = len(spec.objects) if spec is not None else min(2, max(1, len(detect.dominant_colours(video))))
    return detect.subject_paths(video, count)


# ---- subject consistency ----------------------------------------------------------------------------------


def _subject_features(video: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Subject-centred windows of ``rgb * coverage``, ``[F, c*c*3]``; zero rows where the subject is missing."""
    f, h, w, _ = video.shape
    chroma = detect.chroma_and_hue(video)[0]
    image = video.astype(np.float32) / 255.0 * (chroma / 255.0)[..., None]
    side = max(4, _side(video) // 2)
    offsets = np.arange(side, dtype=np.float64) - (side - 1) / 2.0
    features = np.zeros((f, side * side * 3), np.float32)
    for t in np.nonzero(~np.isnan(positions[:, 0]))[0]:
        ys = positions[t, 1] - 0.5 + offsets  # pixel centres sit at i + 0.5
        xs = positions[t, 0] - 0.5 + offsets
        grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
        window = np.stack([ndimage.map_coordinates(image[t, :, :, k], [grid_y, grid_x], order=1, mode="grid-wrap")
                           for k in range(3)], axis=-1)
        features[t] = window.ravel()
    return features


def _anchor_consistency(features: np.ndarray) -> float:
    """VBench's pairing: mean over t >= 1 of (cos(f_t, f_{t-1}) + cos(f_t, f_0)) / 2, cosines clipped at 0."""
    if len(features) < 2:
        return 1.0
    norms = np.linalg.norm(features, axis=1)
    unit = features / np.where(norms > 0, norms, 1.0)[:, None]
    previous = np.maximum(0.0, np.sum(unit[1:] * unit[:-1], axis=1))
    first = np.maximum(0.0, unit[1:] @ unit[0])
    return float(np.mean((previous + first) / 2.0))


def subject_consistency(video, prompt=None) -> float:
    video = detect.check_video(video)
    return _subject_consistency(video, _subject_paths(video, _spec(prompt)))


def _subject_consistency(video, paths) -> float:
    return 100.0 * _mean_over([_anchor_consistency(_subject_features(video, p)) for p in paths])


# ---- background consistency -------------------------------------------------------------------------------


def background_consistency(video) -> float:
    video = detect.check_video(video)
    if len(video) < 2:
        return 100.0
    hidden = detect.foreground(video, threshold=detect.CHROMA_THRESHOLD)
    frames = video.astype(np.float32)

    def similarity(a, b):
        common = ~(hidden[a] | hidden[b])
        if not common.any():
            return 0.0
        return 1.0 - float(np.abs(frames[a] - frames[b])[common].mean()) / 255.0

    scores = [(similarity(t, t - 1) + similarity(t, 0)) / 2.0 for t in range(1, len(video))]
    return 100.0 * float(np.mean(scores))


# ---- motion smoothness ------------------------------------------------------------------------------------


def _track_smoothness(positions: np.ndarray, side: int) -> float:
    if len(positions) < 3:
        return 1.0
    present = ~np.isnan(positions[:, 0])
    path = detect.unwrapped_path(positions, side)
    if path is None:
        return 0.0
    error = np.linalg.norm(path[1:-1] - (path[:-2] + path[2:]) / 2.0, axis=1) / (side / 4.0)
    error[~(present[:-2] & present[1:-1] & present[2:])] = 1.0
    return float(1.0 - np.mean(np.minimum(1.0, error)))


def motion_smoothness(video, prompt=None) -> float:
    video = detect.check_video(video)
    return _motion_smoothness(video, _subject_paths(video, _spec(prompt)))


def _motion_smoothness(video, paths) -> float:
    return 100.0 * _mean_over([_track_smoothness(p, _side(video)) for p in paths])


# ---- temporal flickering (VBench's definition) ------------------------------------------------------------


def temporal_flickering(video) -> float:
    video = detect.check_video(video)
    if len(video) < 2:
        return 100.0
    frames = video.astype(np.float32)
    mean_abs_diff = np.abs(frames[1:] - frames[:-1]).mean(axis=(1, 2, 3))
    return 100.0 * float(np.mean((255.0 - mean_abs_diff) / 255.0))


# ---- imaging quality --------------------------------------------------------------------------------------


def edge_widths(chroma: np.ndarray) -> np.ndarray:
    """Widths (pixels) of the strong chroma edges of ``chroma [..., H, W]``: at each local maximum of the
    central difference along its dominant axis (|g| >= 24), the contrast over four pixels across it divided
    by |g|. Contrast-free, and 2 for any edge whose transition lies within one pixel, whatever its phase."""
    widths = []
    for axis in (-1, -2):
        g = np.abs(np.roll(chroma, -1, axis) - np.roll(chroma, 1, axis)) / 2.0
        across = np.abs(np.roll(chroma, -1, -3 - axis) - np.roll(chroma, 1, -3 - axis)) / 2.0
        peak = ((g >= EDGE_GRADIENT_MIN) & (g >= across) & (g >= np.roll(g, 1, axis))
                & (g > np.roll(g, -1, axis)))
        contrast = np.abs(np.roll(chroma, -2, axis) - np.roll(chroma, 2, axis))
        widths.append(contrast[peak] / g[peak])
    return np.concatenate(widths)


def noise_level(video: np.ndarray) -> float:
    """Noise standard deviation (grey levels) of the luma: Immerkaer's operator, robust (median) version.

    The kernel is the product of second differences along x and y, so it ignores flat areas, ramps and
    one-dimensional patterns (gradients, stripes); the median ignores the few pixels on object edges.
    """
    luma = video.astype(np.float32).mean(-1)
    kernel = np.asarray([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)[None]
    response = np.abs(ndimage.convolve(luma, kernel, mode="wrap"))
    return float(np.median(response) / (0.6745 * 6.0))  # |N(0, 6 sigma)| has median 0.6745 * 6 sigma


@functools.lru_cache(maxsize=None)
def reference_edge_widths(side: int) -> tuple[float, float]:
    """(w_sharp, w_blur): mean edge width of a band of full chroma with one-pixel anti-aliased edges, sharp
    and blurred by sigma = side / 32, over eight sub-pixel offsets."""
    centres = np.arange(side) + 0.5
    widths = {"sharp": [], "blur": []}
    for phase in np.arange(8) / 8:
        left, right = side / 4 + phase, 3 * side / 4 + phase
        coverage = np.clip(np.minimum(centres - left, right - centres) + 0.5, 0.0, 1.0)
        for kind, profile in (("sharp", coverage),
                              ("blur", ndimage.gaussian_filter1d(coverage, side / 32, mode="wrap"))):
            widths[kind].append(edge_widths(np.broadcast_to(255.0 * profile, (side, side))))
    return float(np.concatenate(widths["sharp"]).mean()), float(np.concatenate(widths["blur"]).mean())


def imaging_quality(video) -> float:
    video = detect.check_video(video)
    widths = edge_widths(detect.chroma_and_hue(video)[0])
    if widths.size == 0:
        return 0.0
    sharp, blurred = reference_edge_widths(_side(video))
    sharpness = np.clip((blurred - widths.mean()) / (blurred - sharp), 0.0, 1.0)
    cleanness = np.clip(1.0 - noise_level(video) / NOISE_LIMIT, 0.0, 1.0)
    return 100.0 * float(sharpness * cleanness)


# ---- text alignment ---------------------------------------------------------------------------------------


def text_alignment(video, prompt) -> float:
    video = detect.check_video(video)
    spec = _spec(prompt)
    if spec is None:
        raise ValueError("text_alignment needs the prompt")
    return _text_alignment(video, spec, detect.tracks_for(video, spec))


def _text_alignment(video, spec, tracks) -> float:
    scores = []
    for obj, tr in zip(spec.objects, tracks):
        colour = tr.present.mean()
        shape = np.mean([s == obj.shape for s in tr.shapes])
        motion = 1.0 if obj.motion is None else detect.motion_match_fraction(tr.positions, obj.motion,
                                                                             _side(video))
        scores.append((colour + shape + motion) / 3.0)
    return 100.0 * float(np.mean(scores))


# ---- dynamic degree ---------------------------------------------------------------------------------------


def dynamic_degree(video, prompt=None, fps: float = 8.0) -> float:
    video = detect.check_video(video)
    return _dynamic_degree(video, _subject_paths(video, _spec(prompt)), fps)


def _dynamic_degree(video, paths, fps) -> float:
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if len(video) < 2 or not paths:
        return 0.0
    side = _side(video)
    displacement = np.zeros(len(video) - 1)
    for positions in paths:
        path = detect.unwrapped_path(positions, side)
        if path is None:
            continue
        present = ~np.isnan(positions[:, 0])
        step = np.linalg.norm(np.diff(path, axis=0), axis=1)
        step[~(present[1:] & present[:-1])] = 0.0  # no measurement, no flow
        displacement = np.maximum(displacement, step)
    threshold = 6.0 * max(1.0, 8.0 / fps) * side / 256.0
    needed = max(1, round(4 * len(video) / 16))
    return 100.0 if int(np.sum(displacement > threshold)) >= needed else 0.0


# ---- motion fidelity --------------------------------------------------------------------------------------


_AXIS_DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


def displacements(path: np.ndarray, lag: int = MOTION_LAG) -> np.ndarray:
    """``d_t = p_{t+lag} - p_t`` of an unwrapped path ``[F, 2]`` (lag shortened to F - 1 for short paths)."""
    lag = max(1, min(lag, len(path) - 1))
    return path[lag:] - path[:-lag]


def path_speed(path: np.ndarray, lag: int = MOTION_LAG) -> float:
    """Mean speed per frame: ``mean_t |d_t| / lag``."""
    lag = max(1, min(lag, len(path) - 1))
    return float(np.mean(np.linalg.norm(displacements(path, lag), axis=1)) / lag)


def turning_consistency(d: np.ndarray) -> float:
    """``|sum_t a_t| / sum_t |a_t|``, ``a_t`` the signed angle from ``d_t`` to ``d_{t+1}``: 1 for a steady turn."""
    angles = np.arctan2(d[:-1, 0] * d[1:, 1] - d[:-1, 1] * d[1:, 0], np.sum(d[:-1] * d[1:], axis=1))
    total = np.sum(np.abs(angles))
    return float(abs(np.sum(angles)) / total) if total > 0 else 0.0


def axis_balance(d: np.ndarray) -> float:
    """``sum_t min(|d_x|, |d_y|) / sum_t max(|d_x|, |d_y|)``: 1 for a diagonal path, 0 for an axis-parallel one."""
    a = np.abs(d)
    total = np.sum(a.max(1))
    return float(np.sum(a.min(1)) / total) if total > 0 else 0.0


def circle_residual(path: np.ndarray) -> float:
    """RMS radial residual of the least-squares circle through the points (Kasa's algebraic fit)."""
    x, y = path[:, 0], path[:, 1]
    design = np.stack([x, y, np.ones_like(x)], axis=1)
    solution = np.linalg.lstsq(design, x * x + y * y, rcond=None)[0]
    cx, cy = solution[0] / 2.0, solution[1] / 2.0
    radius = np.sqrt(max(solution[2] + cx * cx + cy * cy, 0.0))
    return float(np.sqrt(np.mean((np.hypot(x - cx, y - cy) - radius) ** 2)))


def path_error(path: np.ndarray, motion: str, side: int) -> float:
    """RMS distance (pixels) of the path from the shape of the motion law (see the module docstring)."""
    if motion in _AXIS_DIRECTIONS:
        across = path[:, 1] if _AXIS_DIRECTIONS[motion][0] != 0.0 else path[:, 0]
        return float(np.sqrt(np.mean((across - across.mean()) ** 2)))
    if motion == "circling":
        return circle_residual(path)
    if motion == "bouncing":
        outside = np.maximum(0.0, -path) + np.maximum(0.0, path - side)
        return float(np.sqrt(np.mean(np.sum(outside ** 2, axis=1))))
    return float(np.sqrt(np.mean(np.sum((path - path.mean(0)) ** 2, axis=1))))  # still


@functools.lru_cache(maxsize=None)
def law_range(motion: str, shape: str, frames: int) -> dict[str, tuple[float, float]]:
    """(lo, hi) of the law's speed (side units per frame) and axis balance over ``LAW_DRAWS`` random objects
    of ``motion`` and ``shape`` (drawn as for 16-frame training clips, followed for ``frames`` frames)."""
    rng = np.random.default_rng(17)
    speeds, balances = [], []
    for _ in range(LAW_DRAWS):
        obj = data.random_object(rng, "red", shape, motion, 16)
        path = np.unwrap(data.trajectory(obj, frames), period=1.0, axis=0)
        speeds.append(path_speed(path))
        balances.append(axis_balance(displacements(path)))
    return {"speed": (float(min(speeds)), float(max(speeds))),
            "balance": (float(min(balances)), float(max(balances)))}


def _speed_score(speed: float, lo: float, hi: float) -> float:
    if lo <= speed <= hi:
        return 1.0
    return min(speed / lo, hi / speed) if speed > 0 else 0.0


def motion_scores(positions: np.ndarray, motion: str, shape: str, side: int) -> dict[str, float]:
    """SR, DA and PA (0-100) of one object's positions ``[F, 2]`` (pixels, NaN where absent) against its law."""
    present = ~np.isnan(positions[:, 0])
    path = detect.unwrapped_path(positions, side)
    if path is None or present.mean() < 0.5:
        return {"SR": 0.0, "DA": 0.0, "PA": 0.0}
    d = displacements(path)
    speed = path_speed(path) / side
    pa = 1.0 - min(1.0, path_error(path, motion, side) / (PATH_TOLERANCE * side))
    if motion == "still":
        slowest = data.LINEAR_SPEED[0]
        return {"SR": 100.0 * max(0.0, 1.0 - speed / slowest), "DA": 100.0, "PA": 100.0 * pa}
    law = law_range(motion, shape, len(positions))
    if motion in _AXIS_DIRECTIONS:
        travel = np.sum(np.linalg.norm(d, axis=1))
        da = max(0.0, float(np.sum(d @ np.asarray(_AXIS_DIRECTIONS[motion])))) / travel if travel > 0 else 0.0
    elif motion == "circling":
        da = turning_consistency(d)
    else:  # bouncing
        da = min(1.0, axis_balance(d) / law["balance"][0])
    return {"SR": 100.0 * _speed_score(speed, *law["speed"]), "DA": 100.0 * da, "PA": 100.0 * pa}


def _geometric_mean(values) -> float:
    values = np.asarray(values, np.float64)
    return float(np.prod(np.maximum(values, 0.0)) ** (1.0 / len(values)))


def motion_fidelity(video, prompt) -> dict[str, float]:
    """SR, DA, PA and MF of a video against its prompt's motion laws (NaN if the prompt names no motion)."""
    video = detect.check_video(video)
    spec = _spec(prompt)
    if spec is None:
        raise ValueError("motion_fidelity needs the prompt")
    return _motion_fidelity(video, spec, detect.tracks_for(video, spec))


def _motion_fidelity(video, spec, tracks) -> dict[str, float]:
    per_object = [motion_scores(tr.positions, obj.motion, obj.shape, _side(video))
                  for obj, tr in zip(spec.objects, tracks) if obj.motion is not None]
    if not per_object:
        return dict.fromkeys(("SR", "DA", "PA", "MF"), float("nan"))
    scores = {k: float(np.mean([s[k] for s in per_object])) for k in ("SR", "DA", "PA")}
    scores["MF"] = float(np.mean([_geometric_mean([s["SR"], s["DA"], s["PA"]]) for s in per_object]))
    return scores


def overall(sc: float, ta: float, mf: float) -> float:
    """OV = (SC * TA * MF)^(1/3); NaN when MF is (a prompt without motion)."""
    return float("nan") if np.isnan(mf) else _geometric_mean([sc, ta, mf])


# ---- all at once ------------------------------------------------------------------------------------------


def all_metrics(video, prompt=None, fps: float = 8.0) -> dict[str, float]:
    """Every metric of :data:`METRICS` for one video (TA and the motion fidelity columns only with a prompt,
    else NaN), detecting objects once."""
    video = detect.check_video(video)
    spec = _spec(prompt)
    paths = _subject_paths(video, spec)
    scores = {
        "SC": _subject_consistency(video, paths),
        "BC": background_consistency(video),
        "MS": _motion_smoothness(video, paths),
        "TF": temporal_flickering(video),
        "IQ": imaging_quality(video),
        "TA": float("nan"),
        "DD": _dynamic_degree(video, paths, fps),
        **dict.fromkeys(("SR", "DA", "PA", "MF"), float("nan")),
    }
    if spec is not None:
        tracks = detect.tracks_for(video, spec)
        scores["TA"] = _text_alignment(video, spec, tracks)
        scores.update(_motion_fidelity(video, spec, tracks))
    scores["OV"] = overall(scores["SC"], scores["TA"], scores["MF"])
    return scores

"""Procedural video clips for the tiny model and ShapesBench, generated on the fly from a seed.

A :class:`Scene` is a resolution-free description: a background and one or two objects, each with a colour, a
shape, a size and a motion law, all in units of the image side (positions in [0, 1), speeds per frame). The
same scene renders at any size and any number of frames, so the benchmark's long reference clips (128, 256
frames) follow exactly the motion law of the 16-frame training clips.

The world is a torus: an object moving left leaves at the left edge and comes back at the right. Linear motion
is the only law that reaches an edge (bouncing reflects inside the frame, circling orbits the centre), and
:func:`random_object` places linear movers so that the clip it plans for keeps them whole in frame; longer
renders of the same scene wrap. Every object is whole in frame at frame 0.

Motion laws (x, y in image-side units, t the frame index; an object's "box" is its bounding box):
- ``left/right/up/down``: p(t) = p0 + v t (mod 1), |v| in [0.028, 0.036] per frame along one axis;
- ``bouncing``: each axis a triangle wave between the walls where the box touches the frame, per-axis speed
  in [0.045, 0.065], so each axis reverses at least every 17 frames;
- ``circling``: p(t) = c + R (cos(phase + 2 pi t / P), sin(...)), c within 0.03 of the middle, R in
  [0.14, 0.22] (capped so the box stays in frame), |P| in [20, 32] frames (its sign is the direction);
- ``still``: p(t) = p0.
The slowest moving object covers 0.0275 of the side per frame, above VBench's dynamic-degree threshold of
6/256 of the side per frame.

Rendering is vectorised over clips, frames and pixels with NumPy: shapes are signed-distance functions with a
one-pixel anti-aliased edge, composited over the background in float32 and rounded to uint8 once.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np

from jaxlongvid.tiny import vocab

MAX_OBJECTS = 2
EXTENT_RANGE = (0.14, 0.2)  # object half-size (circle radius), fraction of the side
LINEAR_SPEED = (0.028, 0.036)
BOUNCE_SPEED = (0.045, 0.065)  # per axis
ORBIT_RADIUS = (0.14, 0.22)  # capped so the shape stays in frame (at least 0.16 of the side is left)
ORBIT_CENTRE_JITTER = 0.03
ORBIT_PERIOD = (20.0, 32.0)
TWO_OBJECT_PROBABILITY = 0.6  # tried; about 0.18 of scenes end with two (the second must keep clear)
CAPTION_WITHOUT_BACKGROUND_PROBABILITY = 0.1

_DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
# Shape proportions relative to the extent e, chosen so every shape has an area close to the circle's.
_SQUARE_HALF_SIDE = 0.88
_DIAMOND_HALF_DIAGONAL = 1.2
_TRIANGLE_HALF_BASE = 1.15
_TRIANGLE_HEIGHT = 2.3
_CHECKER_CELLS = 4  # cells across the checkered square


@dataclass(frozen=True)
class SceneObject:
    """One object. Positions and speeds are in image-side units.

    ``start``: position at frame 0 (for ``circling``: the orbit's centre). ``velocity``: per frame (linear and
    bouncing). ``radius``, ``period``, ``phase``: the orbit (``circling`` only; the sign of ``period`` is the
    direction of rotation).
    """

    colour: str
    shape: str
    motion: str
    extent: float
    start: tuple[float, float]
    velocity: tuple[float, float] = (0.0, 0.0)
    radius: float = 0.0
    period: float = 0.0
    phase: float = 0.0

    def __post_init__(self):
        _check_choice("colour", self.colour, vocab.COLOURS)
        _check_choice("shape", self.shape, vocab.SHAPES)
        _check_choice("motion", self.motion, vocab.MOTIONS)
        if not 0.0 < self.extent < 0.5:
            raise ValueError(f"SceneObject.extent must be in (0, 0.5), got {self.extent}")
        if self.motion == "circling" and (self.radius <= 0.0 or abs(self.period) < 2.0):
            raise ValueError(f"a circling object needs radius > 0 and |period| >= 2, got radius={self.radius}, "
                             f"period={self.period}")


@dataclass(frozen=True)
class Scene:
    """A background and one or two objects (drawn in order, the later one on top)."""

    objects: tuple[SceneObject, ...]
    background: str
    background_seed: int = 0  # picks the gradient direction, stripe layout, texture

    def __post_init__(self):
        _check_choice("background", self.background, vocab.BACKGROUNDS)
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a Scene has 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        colours = [o.colour for o in self.objects]
        if len(set(colours)) != len(colours):
            raise ValueError(f"objects in a Scene must have distinct colours, got {colours}")


@dataclass(frozen=True)
class ObjectSpec:
    """What a prompt says of one object; ``motion`` is None when the prompt does not say."""

    colour: str
    shape: str
    motion: str | None = None


@dataclass(frozen=True)
class PromptSpec:
    objects: tuple[ObjectSpec, ...]
    background: str | None = None


def _check_choice(what, value, allowed):
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {list(allowed)}")


# distance from an object's centre to its farthest point, in extents (the triangle's apex is the farthest)
_BOUNDING_RADIUS = {"circle": 1.0, "square": _SQUARE_HALF_SIDE * np.sqrt(2), "checkered square":
                    _SQUARE_HALF_SIDE * np.sqrt(2), "diamond": _DIAMOND_HALF_DIAGONAL,
                    "triangle": 2.0 * _TRIANGLE_HEIGHT / 3.0}


def margins(shape: str, extent: float) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box of a shape around its centre: (distance to the left and top sides, to the right and
    bottom sides), each ``[x, y]`` in the extent's units. A centre in ``[lo, 1 - hi]`` keeps it in frame."""
    if shape == "triangle":  # apex up; the centre is the centroid, a third of the height above the base
        half_base = _TRIANGLE_HALF_BASE * extent
        return (np.asarray([half_base, 2 * _TRIANGLE_HEIGHT * extent / 3]),
                np.asarray([half_base, _TRIANGLE_HEIGHT * extent / 3]))
    half = {"circle": 1.0, "square": _SQUARE_HALF_SIDE, "checkered square": _SQUARE_HALF_SIDE,
            "diamond": _DIAMOND_HALF_DIAGONAL}[shape] * extent
    return np.asarray([half, half]), np.asarray([half, half])


# ---- motion laws ------------------------------------------------------------------------------------------


def _triangle_wave(start, velocity, low, high, t):
    """Position of a point bouncing between ``low`` and ``high`` (reflecting), unfolded then folded."""
    span = high - low
    unfolded = (start - low) + velocity * t
    folded = np.mod(unfolded, 2.0 * span)
    return low + span - np.abs(folded - span)


def trajectory(obj: SceneObject, frames: int) -> np.ndarray:
    """Object centre per frame, ``float64 [frames, 2]`` as (x, y) in image-side units, in [0, 1)."""
    t = np.arange(frames, dtype=np.float64)[:, None]
    start = np.asarray(obj.start, np.float64)
    velocity = np.asarray(obj.velocity, np.float64)
    if obj.motion == "still":
        positions = np.broadcast_to(start, (frames, 2))
    elif obj.motion in vocab.LINEAR_MOTIONS:
        positions = start + velocity * t
    elif obj.motion == "bouncing":
        low, high = margins(obj.shape, obj.extent)
        positions = _triangle_wave(start, velocity, low, 1.0 - high, t)
    else:  # circling
        angle = obj.phase + 2.0 * np.pi * t[:, 0] / obj.period
        positions = start + obj.radius * np.stack([np.cos(angle), np.sin(angle)], axis=-1)
    return np.mod(positions, 1.0)


# ---- random scenes and prompts ----------------------------------------------------------------------------


def _as_rng(rng_or_seed) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def random_object(rng, colour: str, shape: str, motion: str, frames: int = 16) -> SceneObject:
    """An object with the given identity and a random instance of its motion law, whole in frame.

    Still, bouncing and circling objects stay whole in frame at any length. Linear movers are placed (and
    slowed within the speed range where needed) so that ``frames`` frames keep them whole, which 16 frames
    always allow; longer renders wrap. Bouncing objects are placed so that one axis reverses at a random time
    in [2.5, frames - 3.5]: the clip shows a bounce with at least two frames of travel on either side.
    """
    rng = _as_rng(rng)
    e = float(rng.uniform(*EXTENT_RANGE))
    lo, hi = margins(shape, e)
    hi = 1.0 - hi  # centres in [lo, hi] keep the whole shape in frame
    if motion == "still":
        return SceneObject(colour, shape, motion, e, tuple(rng.uniform(lo, hi)))
    if motion in vocab.LINEAR_MOTIONS:
        direction = np.asarray(_DIRECTIONS[motion])
        axis = int(np.argmax(np.abs(direction)))
        speed = float(rng.uniform(*LINEAR_SPEED))
        if frames > 1:  # slow down (within the speed range) if the clip would not fit otherwise
            speed = min(speed, max(LINEAR_SPEED[0], (hi[axis] - lo[axis]) / (frames - 1)))
        travel = speed * max(frames - 1, 0)
        start = rng.uniform(lo, hi)
        room = (hi[axis] - lo[axis]) - travel
        offset = rng.uniform(0.0, room) if room > 0 else 0.0
        start[axis] = lo[axis] + offset if direction[axis] > 0 else hi[axis] - offset
        return SceneObject(colour, shape, motion, e, tuple(start), tuple(speed * direction))
    if motion == "bouncing":
        velocity = rng.uniform(*BOUNCE_SPEED, 2) * rng.choice([-1.0, 1.0], 2)
        start = rng.uniform(lo, hi)
        if frames >= 6:
            # unfolded coordinate u(t) = u0 + v t reflects at multiples of the span: u0 = (-v t_b) mod span
            axis, bounce_time = int(rng.integers(2)), rng.uniform(2.5, frames - 3.5)
            start[axis] = lo[axis] + np.mod(-velocity[axis] * bounce_time, hi[axis] - lo[axis])
        return SceneObject(colour, shape, motion, e, tuple(start), tuple(velocity))
    # circling
    centre = 0.5 + rng.uniform(-ORBIT_CENTRE_JITTER, ORBIT_CENTRE_JITTER, 2)
    room = min(np.min(centre - lo), np.min(hi - centre))  # the orbit keeps the shape in frame
    radius = float(min(rng.uniform(*ORBIT_RADIUS), room))
    period = float(rng.uniform(*ORBIT_PERIOD) * rng.choice([-1.0, 1.0]))
    return SceneObject(colour, shape, motion, e, tuple(centre), radius=radius, period=period,
                       phase=float(rng.uniform(0.0, 2.0 * np.pi)))


def _objects_apart(rng, identities, frames, tries: int = 25, keep_all: bool = False):
    """Objects for (colour, shape, motion) triples; a second one is redrawn up to ``tries`` times until it does
    not touch the first during ``frames`` frames (bounding circles on the torus), so every object of a planned
    clip is whole. If no draw keeps clear, the second is left out, or with ``keep_all`` kept as last drawn."""
    first = random_object(rng, *identities[0], frames)
    objects, path = [first], trajectory(first, frames)
    for identity in identities[1:]:
        for _ in range(tries):
            second = random_object(rng, *identity, frames)
            gap = np.mod(path - trajectory(second, frames) + 0.5, 1.0) - 0.5
            reach = first.extent * _BOUNDING_RADIUS[first.shape] + second.extent * _BOUNDING_RADIUS[second.shape]
            if np.min(np.sum(gap * gap, axis=1)) > (reach + 0.02) ** 2:
                objects.append(second)
                break
        else:
            if keep_all:
                objects.append(second)
    return tuple(objects)


def random_scene(rng, frames: int = 16, num_objects: int | None = None) -> Scene:
    """A random scene: background, colours, shapes and motions drawn uniformly; a second object is tried with
    probability 0.6 and kept if it can stay clear of the first during ``frames`` frames (about 0.18 of the
    scenes end with two; see :func:`_objects_apart`)."""
    rng = _as_rng(rng)
    if num_objects is None:
        num_objects = 2 if rng.random() < TWO_OBJECT_PROBABILITY else 1
    colours = rng.choice(list(vocab.COLOURS), size=num_objects, replace=False)
    identities = [(str(c), str(rng.choice(vocab.SHAPES)), str(rng.choice(list(vocab.MOTIONS)))) for c in colours]
    return Scene(_objects_apart(rng, identities, frames), str(rng.choice(vocab.BACKGROUNDS)),
                 int(rng.integers(2**31)))


def scene_from_prompt(prompt: str | PromptSpec, rng, frames: int = 16) -> Scene:
    """A random scene that matches ``prompt``: what it leaves open (motion, background) is drawn at random.

    Two prompted objects are kept apart during ``frames`` frames when 25 draws allow it (else they may touch).
    """
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    rng = _as_rng(rng)
    identities = [(o.colour, o.shape, o.motion or str(rng.choice(list(vocab.MOTIONS)))) for o in spec.objects]
    background = spec.background or str(rng.choice(vocab.BACKGROUNDS))
    return Scene(_objects_apart(rng, identities, frames, keep_all=True), background, int(rng.integers(2**31)))


# ---- captions ---------------------------------------------------------------------------------------------


def caption(scene: Scene, with_background: bool = True) -> str:
    """The template caption, e.g. ``"a red triangle bouncing on a striped background"``."""
    parts = [vocab.OBJECT_TEMPLATE.format(colour=o.colour, shape=o.shape, motion=vocab.MOTIONS[o.motion])
             for o in scene.objects]
    text = " and ".join(parts)
    if with_background:
        text += " " + vocab.BACKGROUND_TEMPLATE.format(background=scene.background)
    return text


def _phrase_table():
    table = {}
    for name in vocab.COLOURS:
        table[name] = ("colour", name)
    for name in vocab.SHAPES:
        table[name] = ("shape", name)
    for name, phrase in vocab.MOTIONS.items():
        table[phrase] = ("motion", name)
    table["still"] = ("motion", "still")
    for name in vocab.BACKGROUNDS:
        table[f"{name} background"] = ("background", name)
    return table


_PHRASES = _phrase_table()
_MAX_PHRASE_WORDS = max(len(p.split()) for p in _PHRASES)
_FILLER = {"a", "an", "the", "on", "and", "is", "one"}


def parse_prompt(text: str) -> PromptSpec:
    """Parse a prompt in the caption language into colour / shape / motion per object and the background.

    A colour starts a new object; shape and motion attach to the object being read. Motion and background
    may be missing (None). Raises ``ValueError`` naming the word it cannot read, or the object without shape.
    """
    if not isinstance(text, str):
        raise ValueError(f"a prompt must be a string, got {type(text).__name__}")
    words = re.sub(r"[^a-z ]", " ", text.lower()).split()
    objects, background, i = [], None, 0
    while i < len(words):
        for n in range(min(_MAX_PHRASE_WORDS, len(words) - i), 0, -1):
            match = _PHRASES.get(" ".join(words[i:i + n]))
            if match:
                break
        else:
            if words[i] not in _FILLER:
                raise ValueError(f"cannot parse prompt {text!r}: unknown word {words[i]!r}")
            i += 1
            continue
        kind, value = match
        if kind == "colour":
            objects.append({"colour": value, "shape": None, "motion": None})
        elif kind == "background":
            background = value
        elif not objects:
            raise ValueError(f"cannot parse prompt {text!r}: {kind} {value!r} before any colour")
        else:
            objects[-1][kind] = value
        i += n
    if not objects:
        raise ValueError(f"cannot parse prompt {text!r}: no object colour ({list(vocab.COLOURS)})")
    for o in objects:
        if o["shape"] is None:
            raise ValueError(f"cannot parse prompt {text!r}: the {o['colour']} object has no shape")
    return PromptSpec(tuple(ObjectSpec(**o) for o in objects), background)


# ---- rendering --------------------------------------------------------------------------------------------


def background_image(scene: Scene, size: int) -> np.ndarray:
    """The static background as grey levels, ``float32 [size, size]`` in [0, 255]."""
    name = scene.background
    if name in vocab.PLAIN_BACKGROUNDS:
        return np.full((size, size), vocab.PLAIN_BACKGROUNDS[name], np.float32)
    rng = np.random.default_rng(scene.background_seed)
    u = (np.arange(size, dtype=np.float32) + 0.5) / size
    if name == "gradient":  # dark to light along one of four directions
        ramp = 30.0 + 195.0 * u
        ramp = ramp[::-1] if rng.random() < 0.5 else ramp
        return np.ascontiguousarray(np.broadcast_to(ramp[None, :] if rng.random() < 0.5 else ramp[:, None],
                                                    (size, size)), np.float32)
    if name == "striped":  # two grey levels, horizontal or vertical bands, box-filtered over each pixel
        period = float(rng.choice([1 / 8, 1 / 6]))
        shift = rng.random() * period
        edges = np.arange(size + 1, dtype=np.float64) / size + shift
        dark_so_far = np.floor(edges / period) * period / 2 + np.minimum(np.mod(edges, period), period / 2)
        dark = np.diff(dark_so_far) * size  # fraction of each pixel in a dark band
        band = (180.0 - 110.0 * dark).astype(np.float32)
        return np.ascontiguousarray(np.broadcast_to(band[None, :] if rng.random() < 0.5 else band[:, None],
                                                    (size, size)))
    # textured: smooth random grey field, bilinear from an 8x8 grid on the torus (resolution-free)
    grid = rng.uniform(40.0, 215.0, (8, 8)).astype(np.float32)
    return _periodic_bilinear(grid, size)


def _periodic_bilinear(grid: np.ndarray, size: int) -> np.ndarray:
    n = grid.shape[0]
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size * n - 0.5
    i0 = np.floor(coords).astype(int)
    frac = coords - i0
    i0, i1 = np.mod(i0, n), np.mod(i0 + 1, n)
    rows = grid[i0] * (1 - frac)[:, None] + grid[i1] * frac[:, None]
    return rows[:, i0] * (1 - frac)[None, :] + rows[:, i1] * frac[None, :]


def _shape_sdf(shape: str, dx: np.ndarray, dy: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Signed distance (pixels, negative inside) of shapes centred at the origin with extent ``e`` (pixels)."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - e
    if shape in ("square", "checkered square"):
        return np.maximum(ax, ay) - _SQUARE_HALF_SIDE * e
    if shape == "diamond":
        return (ax + ay - _DIAMOND_HALF_DIAGONAL * e) * np.float32(1 / np.sqrt(2))
    # triangle, apex up, origin at its centroid: apex at -2H/3, base at +H/3 (image y points down)
    h, b = _TRIANGLE_HEIGHT * e, _TRIANGLE_HALF_BASE * e
    norm = np.sqrt(h * h + b * b)
    side = (h * ax - b * dy - 2.0 * b * h / 3.0) / norm
    return np.maximum(side, dy - h / 3.0)


def _box_filtered_square_wave(u, cell):
    """Mean over [u - 1/2, u + 1/2] of the wave that is +1 on [0, cell) and -1 on [cell, 2 cell), periodic;
    its integral is the triangle wave cell - |(u mod 2 cell) - cell|."""
    def integral(v):
        return cell - np.abs(np.mod(v, 2.0 * cell) - cell)
    return integral(u + 0.5) - integral(u - 0.5)


def _coverage(objects, frames, size):
    """Coverage ``alpha`` and colour ``rgb`` of objects that share one shape, ``float32 [n, F, H, W(, 3)]``."""
    centres = np.stack([trajectory(o, frames) for o in objects]).astype(np.float32) * size  # [n, F, 2]
    extent = np.asarray([o.extent for o in objects], np.float32)[:, None, None, None] * size
    pixel = np.arange(size, dtype=np.float32) + 0.5
    # offsets to the nearest periodic copy of the centre: the torus
    dx = pixel[None, None, None, :] - centres[:, :, 0, None, None]
    dy = pixel[None, None, :, None] - centres[:, :, 1, None, None]
    dx = np.mod(dx + size / 2, size) - size / 2
    dy = np.mod(dy + size / 2, size) - size / 2
    shape = objects[0].shape
    alpha = np.clip(0.5 - _shape_sdf(shape, dx, dy, extent), 0.0, 1.0)
    rgb = np.asarray([vocab.COLOURS[o.colour] for o in objects], np.float32)[:, None, None, None, :]
    if shape in vocab.PATTERNED_SHAPES:
        half_side = _SQUARE_HALF_SIDE * extent
        cell = 2.0 * half_side / _CHECKER_CELLS
        # checker = product of two +-1 square waves, each box-filtered over the pixel (anti-aliased cells)
        product = _box_filtered_square_wave(dx + half_side, cell) * _box_filtered_square_wave(dy + half_side, cell)
        shade = 1.0 - (1.0 - vocab.DARK_CELL_FACTOR) * (1.0 - product) / 2.0
        return alpha, rgb * shade[..., None]
    return alpha, np.broadcast_to(rgb, alpha.shape + (3,))


def render_batch(scenes, frames: int, size: int = 32) -> np.ndarray:
    """Render scenes to ``uint8 [B, frames, size, size, 3]``."""
    scenes = list(scenes)
    if not scenes:
        raise ValueError("render_batch needs at least one scene")
    if frames < 1 or size < 8:
        raise ValueError(f"need frames >= 1 and size >= 8, got frames={frames}, size={size}")
    b = len(scenes)
    video = np.empty((b, frames, size, size, 3), np.float32)
    video[...] = np.stack([background_image(s, size) for s in scenes])[:, None, :, :, None]
    for slot in range(MAX_OBJECTS):
        holders = [i for i, s in enumerate(scenes) if len(s.objects) > slot]
        if not holders:
            break
        alpha = np.empty((len(holders), frames, size, size, 1), np.float32)
        rgb = np.empty((len(holders), frames, size, size, 3), np.float32)
        for shape in vocab.SHAPES:
            rows = [k for k, i in enumerate(holders) if scenes[i].objects[slot].shape == shape]
            if rows:
                a, c = _coverage([scenes[holders[k]].objects[slot] for k in rows], frames, size)
                alpha[rows, ..., 0], rgb[rows] = a, c
        target = video if len(holders) == b else video[holders]
        target += alpha * (rgb - target)  # in place: over-compositing
        if len(holders) != b:
            video[holders] = target
    np.rint(video, out=video)
    return np.clip(video, 0, 255, out=video).astype(np.uint8)


def render(scene: Scene, frames: int, size: int = 32) -> np.ndarray:
    """Render one scene to ``uint8 [frames, size, size, 3]``."""
    return render_batch([scene], frames, size)[0]


def ground_truth(scenes, frames: int, size: int = 32) -> dict:
    """Per-clip truth, padded to two objects (index -1 / NaN where a scene has one).

    ``positions [B, 2, F, 2]`` object centres in pixels (x, y; pixel i spans [i, i+1)); ``extent [B, 2]``
    pixels; ``colour``, ``shape``, ``motion [B, 2]`` and ``background [B]`` as indices into the vocab tables;
    ``num_objects [B]``; ``scenes`` the Scene values.
    """
    scenes = list(scenes)
    b = len(scenes)
    positions = np.full((b, MAX_OBJECTS, frames, 2), np.nan, np.float32)
    extent = np.full((b, MAX_OBJECTS), np.nan, np.float32)
    ids = {k: np.full((b, MAX_OBJECTS), -1, np.int32) for k in ("colour", "shape", "motion")}
    tables = {"colour": list(vocab.COLOURS), "shape": list(vocab.SHAPES), "motion": list(vocab.MOTIONS)}
    for i, scene in enumerate(scenes):
        for j, obj in enumerate(scene.objects):
            positions[i, j] = trajectory(obj, frames) * size
            extent[i, j] = obj.extent * size
            for k, table in tables.items():
                ids[k][i, j] = table.index(getattr(obj, k))
    return {"positions": positions, "extent": extent, **ids,
            "background": np.asarray([vocab.BACKGROUNDS.index(s.background) for s in scenes], np.int32),
            "num_objects": np.asarray([len(s.objects) for s in scenes], np.int32), "scenes": scenes}


def sample_batch(rng_or_seed, batch: int, frames: int = 16, size: int = 32, dtype="uint8"):
    """A batch of random clips with captions and ground truth.

    Returns ``(videos, captions, truth)``: videos ``[B, frames, size, size, 3]`` as uint8 (``dtype="uint8"``) or
    float32 in [-1, 1] (``dtype="float32"``); captions (the background is left out of one in ten, so the model
    also learns prompts without it); truth from :func:`ground_truth`.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if dtype not in ("uint8", "float32"):
        raise ValueError(f"dtype must be 'uint8' or 'float32', got {dtype!r}")
    rng = _as_rng(rng_or_seed)
    scenes = [random_scene(rng, frames) for _ in range(batch)]
    drop = rng.random(batch) < CAPTION_WITHOUT_BACKGROUND_PROBABILITY
    captions = [caption(s, with_background=not d) for s, d in zip(scenes, drop)]
    videos = render_batch(scenes, frames, size)
    if dtype == "float32":
        videos = videos.astype(np.float32) / 127.5 - 1.0
    return videos, captions, ground_truth(scenes, frames, size)


def replace_object(scene: Scene, index: int, **changes) -> Scene:
    """A copy of ``scene`` with object ``index`` changed (e.g. ``colour="blue"``): for tests and corruptions."""
    objects = list(scene.objects)
    objects[index] = dataclasses.replace(objects[index], **changes)
    return dataclasses.replace(scene, objects=tuple(objects))

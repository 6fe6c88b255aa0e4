"""Long-video methods as data, made of parts.

A :class:`Method` is four small frozen values, each with one job:

* ``positions``: the relative-position maps ``[M, N, N]`` the model is shown (:class:`Identity`, :class:`Clip`,
  :class:`Interpolate`, :class:`Group`, :class:`GroupShift`, :class:`VRPR`);
* ``mask``: which keys a query may see (``None``, :class:`Window`, :class:`IFS`, :class:`Tiered`);
* ``merge``: how several attentions make the output (``None``, :class:`FreeNoiseWindows`, :class:`FreeLongBlend`);
* ``noise``: the initial latents (:class:`Gaussian`, :class:`FreeNoiseShuffle`).

Every part is hashable, so a Method is a static attribute of a Flax module or a static argument of ``jax.jit``.
Maps and masks are formulas over an array module ``xp`` (see :mod:`jaxlongvid.positions`): with
``xp=jax.numpy`` (the default of ``maps`` and ``static``) they are built inside the traced program from iotas,
never captured as constants. Presets are compositions in the ``PRESETS`` table; a new method is a new part.

A :class:`MethodPlan` routes methods per temporal layer (FreeLOC's layer-adaptive routing), keyed by the layer's
path (``temporal_layer_names``) or forward index; :meth:`MethodPlan.resolve` turns indices into paths once, then
``plan.for_layer(path)`` answers each layer. A :class:`TimePlan` schedules methods over denoising time (the
``keepmotion`` preset in ``TIME_PRESETS``). :func:`parse_method` reads a preset name, ``name:key=value,...``,
``A~0.25~B`` (a TimePlan), ``auto`` or a probe's JSON file.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional, Union

import jax.numpy as jnp
import numpy as np

from jaxlongvid import masks, noise, positions


def _check_fields(part, minimum: dict):
    """``part``'s integer fields named in ``minimum`` (None allowed where the default is None) are >= bounds."""
    for name, least in minimum.items():
        value = getattr(part, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{type(part).__name__}.{name} must be an integer, got {value!r}")
        if value < least:
            raise ValueError(f"{type(part).__name__}.{name} must be >= {least}, got {value}")


# ---- positions --------------------------------------------------------------------------------------------------
class Positions:
    """A relative-position map family. Subclasses give ``at(d, n, n0, xp)``: the mapped values of distances
    ``d`` (any shape) as ``[M, *d.shape]``. Below or at the native length N0 every family is the identity."""

    def at(self, d, n: int, n0: int, xp):
        raise NotImplementedError

    def mapped(self, d, n: int, n0: int, xp):
        return d[None] if n <= n0 else self.at(d, n, n0, xp)

    def maps(self, n: int, n0: int, xp=jnp):
        """``[M, N, N]`` maps; ``xp=jnp`` builds them in the traced program from iotas."""
        return self.mapped(positions.distance(n, xp), n, n0, xp)

    def profile(self, n: int, n0: int) -> np.ndarray:
        """The maps as a function of ``d = -(N-1) .. N-1``: NumPy ``[M, 2N - 1]`` (every map depends on d alone),
        for static analysis that must not cost O(M N^2) at trace time."""
        return self.mapped(np.arange(-(n - 1), n, dtype=np.int32), n, n0, np)

    def planes(self, n: int, n0: int) -> Optional[tuple[tuple[int, int], ...]]:
        """The plane cover of the maps in closed form (see ``jaxlongvid.attention.plane_cover``), or None."""
        return None

    def encoding_at(self, encoding, n: int, n0: int):
        """The position encoding (``jaxlongvid.attention.Encoding``) the attention uses at N frames: the model's
        own, unless the part changes its RoPE frequencies (:class:`RIFLEx`)."""
        return encoding


@dataclass(frozen=True)
class Identity(Positions):
    """The model's own positions, ``P = j - i`` (the unmodified model; LongDiff's "no PM" ablation)."""

    def at(self, d, n, n0, xp):
        return d[None]


@dataclass(frozen=True)
class Clip(Positions):
    """LongDiff's Clip ablation: ``clip(d, -c, c)`` with ``c = max_distance`` (None: ``N0 - 1``)."""

    max_distance: Optional[int] = None

    def __post_init__(self):
        _check_fields(self, {"max_distance": 0})

    def at(self, d, n, n0, xp):
        return positions.clip_of(d, n0 - 1 if self.max_distance is None else self.max_distance, xp)[None]


@dataclass(frozen=True)
class Interpolate(Positions):
    """LongDiff's Interpolation ablation: ``d * (N0 - 1) / (N - 1)``, fractional (RoPE takes real angles)."""

    def at(self, d, n, n0, xp):
        return positions.interpolate_of(d, n, n0, xp)[None]


def _group_planes(s: int) -> tuple[tuple[int, int], ...]:
    """Grouped maps take ``floor(j / s) - floor(i / s) + c`` with c in {0, 1, -1} at every entry: each copy's
    value lies in {floor(d / s), ceil(d / s)} and the plane grid's in {floor(d / s), floor(d / s) + 1}."""
    return ((s, 0), (s, 1), (s, -1))


@dataclass(frozen=True)
class Group(Positions):
    """LongDiff's Group-only ablation: ``sign(d) ceil(|d| / s)``, ``s = ceil((N - 1) / (G - 1))``, G =
    ``num_groups`` (None: N0)."""

    num_groups: Optional[int] = None

    def __post_init__(self):
        _check_fields(self, {"num_groups": 2})

    def at(self, d, n, n0, xp):
        g = self.num_groups or n0
        return d[None] if n <= g else positions.grouped_of(d, positions.group_size(n, g), 0, xp)[None]

    def planes(self, n, n0):
        g = self.num_groups or n0
        return None if n <= max(g, n0) else _group_planes(positions.group_size(n, g))


@dataclass(frozen=True)
class GroupShift(Positions):
    """LongDiff's Position Mapping (GROUP+SHIFT): the s copies ``sign(d) ceil(max(|d| - m, 0) / s)``, m < s,
    whose softmaxes the attention averages. G = ``num_groups`` (None: N0)."""

    num_groups: Optional[int] = None

    def __post_init__(self):
        _check_fields(self, {"num_groups": 2})

    def at(self, d, n, n0, xp):
        g = self.num_groups or n0
        return d[None] if n <= g else positions.group_shift_of(d, positions.group_size(n, g), xp)

    def planes(self, n, n0):
        g = self.num_groups or n0
        return None if n <= max(g, n0) else _group_planes(positions.group_size(n, g))


# FreeLOC's published VRPR settings for Wan2.1 (Westlake-AGI-Lab/FreeLOC, wan/runtime_config_freeloc.py,
# "rp_map.vrpr.frame_settings": 41 latent frames -> 12/20/2/8, 81 -> 10/14/2/8), keyed here by the length they
# serve in multiples r of the native length: N - 1 <= r (N0 - 1) (41 = 2x, 81 = 4x of Wan's 21 latent frames).
# Longer videos take the last setting.
VRPR_SETTINGS = ((2, (12, 20, 2, 8)), (4, (10, 14, 2, 8)))


def vrpr_setting(n: int, n0: int) -> tuple[int, int, int, int]:
    """FreeLOC's published (W1, W2, G1, G2) for N frames of a model trained on N0 (``VRPR_SETTINGS``)."""
    for ratio, setting in VRPR_SETTINGS:
        if n - 1 <= ratio * (n0 - 1):
            return setting
    return VRPR_SETTINGS[-1][1]


@dataclass(frozen=True)
class VRPR(Positions):
    """FreeLOC's multi-granularity re-encoding (``positions.vrpr``), capped at N0 - 1. Defaults: the paper's 4x
    setting W1, W2, G1, G2 = 10, 14, 2, 8; all four None: FreeLOC's published setting for the video's length
    (:func:`vrpr_setting`: 12/20/2/8 up to 2x, 10/14/2/8 beyond)."""

    w1: Optional[int] = 10
    w2: Optional[int] = 14
    g1: Optional[int] = 2
    g2: Optional[int] = 8

    def __post_init__(self):
        given = [v is not None for v in (self.w1, self.w2, self.g1, self.g2)]
        if any(given) and not all(given):
            raise ValueError(f"VRPR: give all of w1, w2, g1, g2 or none (per length), got {self}")
        _check_fields(self, {"w1": 0, "w2": self.w1 or 0, "g1": 1, "g2": 1})

    def setting(self, n: int, n0: int) -> tuple[int, int, int, int]:
        """(W1, W2, G1, G2) at N frames."""
        return vrpr_setting(n, n0) if self.w1 is None else (self.w1, self.w2, self.g1, self.g2)

    def at(self, d, n, n0, xp):
        return positions.vrpr_of(d, *self.setting(n, n0), n0 - 1, xp)[None]


def intrinsic_frequency(freqs: np.ndarray, n0: int) -> int:
    """RIFLEx's intrinsic component (1-based, as its ``identify_k``): the RoPE frequency whose period
    ``round(2 pi / theta_j)`` is closest to ``n0`` frames (the first on ties)."""
    periods = np.rint(2 * np.pi / np.asarray(freqs, np.float64))
    return int(np.argmin(np.abs(periods - n0))) + 1


@dataclass(frozen=True)
class RIFLEx(Positions):
    """RIFLEx (Zhao et al., ICML 2025, thu-ml/RIFLEx ``get_1d_rotary_pos_embed_riflex``): the model's own
    positions, and beyond N0 the intrinsic frequency ``k`` of the frame RoPE (1-based) lowered to
    ``0.9 * 2 pi / N`` so that one period covers the N frames (0.9: the reference's margin against repetition in
    the tail frames). ``k`` None: :func:`intrinsic_frequency` of the model's frame RoPE at N0 (Wan2.1: k = 4,
    period 22 latent frames; FreeLOC's comparison ran k = 5, ``riflex:k=5``). At or below N0 nothing changes."""

    k: Optional[int] = None

    def __post_init__(self):
        _check_fields(self, {"k": 1})

    def at(self, d, n, n0, xp):
        return d[None]

    def encoding_at(self, encoding, n, n0):
        if n <= n0 or not encoding.rope_dim:
            return encoding
        k = self.k or intrinsic_frequency(encoding.rope_freqs(), n0)
        if k > encoding.rope_dim // 2:
            raise ValueError(f"RIFLEx.k={k} exceeds the {encoding.rope_dim // 2} RoPE frequencies of the encoding")
        return dataclasses.replace(encoding, rope_freq_overrides=((k - 1, 0.9 * 2 * np.pi / n),))


# ---- masks ------------------------------------------------------------------------------------------------------
class Mask:
    """Which keys each query sees. ``static(n, xp)`` is the part known before run time (bool [N, N] or None)."""

    needs_keyframes = False

    def static(self, n: int, xp=jnp):
        return None

    def most_visible(self, n: int, n0: int) -> int:
        """An upper bound on the key frames one query frame sees at N frames (static; the by-query-frame
        attention gathers that many). From the static part on the host; parts chosen at run time say their own."""
        static = self.static(n, np)
        return n if static is None else int(np.max(np.sum(static, axis=-1)))

    def hides_nothing(self, n: int) -> bool:
        """Whether the static part is known to keep every key at N frames (then it is no mask at all: the
        attention runs exactly as without it). Checked on the host over the N x N frames."""
        static = self.static(n, np)
        return static is not None and bool(np.all(static))


@dataclass(frozen=True)
class Window(Mask):
    """A local window ``|i - j| <= radius``."""

    radius: int = 8

    def __post_init__(self):
        _check_fields(self, {"radius": 0})

    def static(self, n, xp=jnp):
        return masks.window(n, self.radius, xp)


@dataclass(frozen=True)
class IFS(Mask):
    """LongDiff's Informative Frame Selection: ``|i - j| <= window`` or j is one of the ``num_segments``
    keyframes (None: ``max(1, N // N0)``), chosen at run time from the layer's input (``keyframes.py``)."""

    window: int = 8
    num_segments: Optional[int] = None

    needs_keyframes = True

    def __post_init__(self):
        _check_fields(self, {"window": 0, "num_segments": 1})

    def segments(self, n: int, n0: int) -> int:
        """IFS segment count for this video."""
        return min(n, self.num_segments or max(1, n // n0))

    def with_keyframes(self, n: int, keyframes):
        return masks.ifs_mask(n, keyframes, self.window)

    def most_visible(self, n: int, n0: int) -> int:
        return min(n, 2 * self.window + 1 + self.segments(n, n0))


@dataclass(frozen=True)
class Tiered(Mask):
    """FreeLOC's tiered sparse attention for frames: ``tiers`` of (max distance, stride), and the first
    ``sink_frames`` frames visible to every query (``masks.tiered``)."""

    tiers: tuple[tuple[int, int], ...] = ((8, 1), (24, 4))
    sink_frames: int = 1

    def __post_init__(self):
        object.__setattr__(self, "tiers", tuple(tuple(int(x) for x in t) for t in self.tiers))
        _check_fields(self, {"sink_frames": 0})
        masks.tiered(2, self.tiers, self.sink_frames)  # checks the tiers

    def static(self, n, xp=jnp):
        return masks.tiered(n, self.tiers, self.sink_frames, xp)


# ---- merges -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FreeNoiseWindows:
    """FreeNoise: attention within windows of ``window`` frames every ``stride`` frames, fused per frame with
    pyramid weights."""

    window: int = 16
    stride: int = 4

    def __post_init__(self):
        _check_fields(self, {"window": 1, "stride": 1})


@dataclass(frozen=True)
class FreeLongBlend:
    """FreeLong: low frequencies (Gaussian low-pass, stop frequencies ``d_t`` over frames and ``d_s`` over
    height and width) of global attention, high ones of local attention in windows of ``2 local_window + 1``.
    The method's positions map the global branch only; the local branch stays inside the trained window and
    reads exact distances (so ``freelong:positions=group_shift`` blends LongDiff's layout with exact local motion)."""

    local_window: int = 8
    d_t: float = 0.25
    d_s: float = 0.25

    def __post_init__(self):
        _check_fields(self, {"local_window": 1})
        if not (self.d_t > 0 and self.d_s > 0):
            raise ValueError(f"FreeLongBlend.d_t and d_s must be > 0, got {self.d_t}, {self.d_s}")


# ---- initial noise ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gaussian:
    """Independent standard normal latents."""

    def sample(self, key, shape, axis: int = 1):
        return noise.gaussian(key, shape)


@dataclass(frozen=True)
class FreeNoiseShuffle:
    """FreeNoise's noise rescheduling along frames (``noise.freenoise``): window ``window``, stride ``stride``."""

    window: int = 16
    stride: int = 4

    def __post_init__(self):
        _check_fields(self, {"window": 1, "stride": 1})

    def sample(self, key, shape, axis: int = 1):
        return noise.freenoise(key, shape, window=self.window, stride=self.stride, axis=axis)


# ---- the method -------------------------------------------------------------------------------------------------
KINDS = {  # each part slot's kinds by name (spec strings, ``parse_method``)
    "positions": {"identity": Identity, "clip": Clip, "interpolate": Interpolate, "group": Group,
                  "group_shift": GroupShift, "vrpr": VRPR, "riflex": RIFLEx},
    "mask": {"none": None, "window": Window, "ifs": IFS, "tiered": Tiered},
    "merge": {"none": None, "freenoise": FreeNoiseWindows, "freelong": FreeLongBlend},
    "noise": {"gaussian": Gaussian, "freenoise": FreeNoiseShuffle},
}
PARTS = ("positions", "mask", "merge", "noise")


@dataclass(frozen=True)
class Method:
    """One temporal-attention method: a name and its four parts. Defaults reproduce the unmodified model."""

    name: str = "custom"
    positions: Positions = Identity()
    mask: Optional[Mask] = None
    merge: Union[FreeNoiseWindows, FreeLongBlend, None] = None
    noise: Union[Gaussian, FreeNoiseShuffle] = Gaussian()

    def __post_init__(self):
        for slot in PARTS:
            value, kinds = getattr(self, slot), tuple(k for k in KINDS[slot].values() if k is not None)
            if not (isinstance(value, kinds) or (value is None and None in KINDS[slot].values())):
                raise ValueError(f"Method.{slot} must be one of {tuple(KINDS[slot])} "
                                 f"({', '.join(k.__name__ for k in kinds)}), got {value!r}")
        if self.merge is not None and self.needs_keyframes:
            raise ValueError(f"Method.merge={type(self.merge).__name__} cannot be combined with an IFS mask")

    def replace(self, **changes) -> "Method":
        return dataclasses.replace(self, **changes)

    @property
    def needs_keyframes(self) -> bool:
        return self.mask is not None and self.mask.needs_keyframes


PRESETS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("direct"),
        Method("freenoise", merge=FreeNoiseWindows(), noise=FreeNoiseShuffle()),
        Method("freelong", merge=FreeLongBlend(), noise=FreeNoiseShuffle()),
        Method("sliding-window", mask=Window()),
        Method("longdiff", positions=GroupShift(), mask=IFS()),
        Method("longdiff-no-pm", mask=IFS()),
        Method("longdiff-no-ifs", positions=GroupShift()),
        Method("clip", positions=Clip(), mask=IFS()),
        Method("interpolate", positions=Interpolate(), mask=IFS()),
        Method("group-only", positions=Group(), mask=IFS()),
        Method("freeloc", positions=VRPR(), mask=Tiered()),
        Method("riflex", positions=RIFLEx()),
    )
}


@dataclass(frozen=True)
class MethodPlan:
    """Per-layer routing: ``layers`` pairs a temporal layer's path (``temporal_layer_names``) or forward index
    with its Method; every other layer runs ``default``. ``name`` labels it in results (empty: ``plan[DEFAULT]``)."""

    default: Method = field(default_factory=Method)
    layers: tuple[tuple[Union[int, str], Method], ...] = ()
    name: str = ""

    def resolve(self, names: tuple[str, ...]) -> "MethodPlan":
        """The plan keyed by paths only: index keys become ``names[index]``; unknown keys are refused."""
        layers = []
        for key, method in self.layers:
            if isinstance(key, int) and not isinstance(key, bool):
                if not 0 <= key < len(names):
                    raise ValueError(f"MethodPlan names temporal layer {key}, but this model has {len(names)} "
                                     f"(0..{len(names) - 1})")
                key = names[key]
            elif key not in names:
                raise ValueError(f"MethodPlan names unknown temporal layer {key!r}; see temporal_layer_names")
            layers.append((key, method))
        return dataclasses.replace(self, layers=tuple(layers))

    def for_layer(self, path: str) -> Method:
        """The Method of the temporal layer at ``path`` (a resolved plan: index keys are refused)."""
        for key, method in self.layers:
            if not isinstance(key, str):
                raise ValueError(f"MethodPlan key {key!r} is a layer index: resolve the plan with the model's "
                                 "layer names first (MethodPlan.resolve)")
            if key == path:
                return method
        return self.default

    @property
    def noise(self):
        return self.default.noise


# FreeLOC's layer assignment for Wan2.1-T2V-1.3B (30 blocks), as shipped in Westlake-AGI-Lab/FreeLOC
# (wan/runtime_config_freeloc.py, "default_rope_relative_layers": the blocks that run tiered sparse attention
# with VRPR; every other block runs VRPR alone), with VRPR at FreeLOC's published setting for each length.
FREELOC_WAN_TSA_LAYERS = (0, 1, 4, 6, 7, 9, 10, 11, 13, 14, 15, 16, 18, 22, 23, 24, 25)
PLAN_PRESETS: dict[str, MethodPlan] = {
    "freeloc-wan": MethodPlan(
        name="freeloc-wan",
        default=Method("freeloc-wan-vrpr", positions=VRPR(None, None, None, None)),
        layers=tuple((i, Method("freeloc-wan-tsa", positions=VRPR(None, None, None, None), mask=Tiered()))
                     for i in FREELOC_WAN_TSA_LAYERS)),
}


@dataclass(frozen=True)
class TimePlan:
    """Methods scheduled over denoising time: ``phases`` pairs the fraction of the steps at which a phase ends
    with the Method (or MethodPlan) it runs, e.g. ``((0.4, longdiff), (1.0, freenoise))``: LongDiff for the
    first 40% of the steps (high noise), FreeNoise for the rest. Fractions increase strictly and the last is 1.
    The initial noise is the first phase's. The sampler resolves the phases to step ranges once
    (``sampling.resolve_phases``) and runs one loop per phase with that phase's static method."""

    name: str
    phases: tuple[tuple[float, Union[Method, MethodPlan]], ...]

    def __post_init__(self):
        phases = tuple((float(end), m) for end, m in self.phases)
        if not phases:
            raise ValueError("TimePlan.phases is empty")
        ends = [end for end, _ in phases]
        if any(not 0.0 < e <= 1.0 for e in ends) or any(b <= a for a, b in zip(ends, ends[1:])) or ends[-1] != 1.0:
            raise ValueError(f"TimePlan.phases: end fractions must increase strictly in (0, 1] and end at 1, got {ends}")
        bad = [type(m).__name__ for _, m in phases if not isinstance(m, (Method, MethodPlan))]
        if bad:
            raise ValueError(f"TimePlan.phases: each phase runs a Method or MethodPlan, got {bad}")
        object.__setattr__(self, "phases", phases)

    @property
    def noise(self):
        """The first phase's noise part: it draws the initial latents."""
        return self.phases[0][1].noise


# Methods scheduled over denoising time, by name like the presets. "keepmotion": LongDiff's grouped positions and
# IFS for the first quarter of the steps (high noise: the global layout, one subject), then FreeNoise's exact local
# positions and window fusion (low noise: motion at the trained speed), from FreeNoise's rescheduled initial noise.
# Measured on ShapesBench it keeps LongDiff's slow motion and ranks below it (docs/motion.md, section 5).
TIME_PRESETS: dict[str, TimePlan] = {
    t.name: t
    for t in (
        TimePlan("keepmotion", ((0.25, PRESETS["longdiff"].replace(noise=FreeNoiseShuffle())),
                                (1.0, PRESETS["freenoise"]))),
    )
}
AUTO = "auto"  # the method name the sampler resolves per model and length (sampling.auto_method)


def get_method(method):
    """A preset name (:data:`PRESETS`, :data:`TIME_PRESETS`), a Method, a MethodPlan or a TimePlan -> the value
    (names are checked; ``"auto"`` needs the model and length: ``sampling.auto_method``)."""
    if isinstance(method, (Method, MethodPlan, TimePlan)):
        return method
    if isinstance(method, str):
        if method in PRESETS:
            return PRESETS[method]
        if method in PLAN_PRESETS:
            return PLAN_PRESETS[method]
        if method in TIME_PRESETS:
            return TIME_PRESETS[method]
        raise ValueError(f"unknown method {method!r}; presets are "
                         f"{sorted(PRESETS) + sorted(PLAN_PRESETS) + sorted(TIME_PRESETS)}"
                         + (" ('auto' is resolved by the sampler for a model and length)" if method == AUTO else ""))
    raise TypeError(f"method must be a preset name, Method, MethodPlan or TimePlan, got {type(method).__name__}")


def as_plan(method: Union[str, Method, MethodPlan]) -> MethodPlan:
    """Any per-step method value as a MethodPlan (one Method: every layer runs it)."""
    method = get_method(method)
    if isinstance(method, TimePlan):
        raise ValueError(f"{method.name!r} schedules methods over denoising time: the sampler runs its phases "
                         "(sampling.resolve_phases); a model call takes one of them")
    return method if isinstance(method, MethodPlan) else MethodPlan(default=method)


# ---- parsing: presets, ``name:key=value`` specs, probe JSON ------------------------------------------------------
_FIELD_TYPES = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "Optional[int]": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
                      "an integer or None"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "tuple[tuple[int, int], ...]": (lambda v: isinstance(v, tuple) and len(v) > 0 and all(
        isinstance(t, tuple) and len(t) == 2 and all(isinstance(x, int) for x in t) for t in v),
        "a tuple of (int, int) pairs, e.g. ((8,1),(24,4))"),
}
# The probe's route for VRPR without a mask (``probing.plan_from_scores``), besides the presets.
PROBE_ROUTES = {"vrpr": Method("vrpr", positions=VRPR())}


def split_top_level(text: str, separators: str) -> list[str]:
    """``text`` split at any of ``separators`` outside parentheses (so tuple values keep their commas)."""
    parts, depth, current = [], 0, []
    for char in text:
        depth += (char in "([") - (char in ")]")
        if char in separators and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise ValueError(f"unbalanced parentheses in {text!r}")
    return parts + ["".join(current)]


def _format_value(value) -> str:
    if isinstance(value, tuple):
        return "(" + ",".join(_format_value(v) for v in value) + ")"
    return str(value)


def _literal(text: str):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a kind name
    if isinstance(value, list):
        value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return value


def _with_kinds(base: Method, kinds: dict) -> Method:
    """``base`` with the part slots in ``kinds`` (slot -> kind name) replaced by that kind's default part."""
    changes = {}
    for slot, kind in kinds.items():
        if kind not in KINDS[slot]:
            raise ValueError(f"Method.{slot} must be one of {tuple(KINDS[slot])}, got {kind!r}")
        cls = KINDS[slot][kind]
        changes[slot] = None if cls is None else cls()
    return base.replace(**changes)


def _apply_fields(method: Method, values: dict) -> tuple[Method, list[str]]:
    """Set each ``key`` (``field`` on every part that has it, or ``slot.field`` on one) to its value; returns
    the method and the keys in canonical order (part slot order, then field order)."""
    targets = {key: [] for key in values}
    order = []
    for slot in PARTS:
        part = getattr(method, slot)
        if part is None:
            continue
        for f in dataclasses.fields(part):
            for key in values:
                if key in (f.name, f"{slot}.{f.name}"):
                    targets[key].append((slot, f))
                    if key not in order:
                        order.append(key)
    unknown = [k for k, t in targets.items() if not t]
    if unknown:
        known = sorted({f.name for slot in PARTS if getattr(method, slot) is not None
                        for f in dataclasses.fields(getattr(method, slot))})
        raise ValueError(f"unknown Method field(s) {', '.join(map(repr, unknown))}; this method's part fields are "
                         f"{', '.join(known)} (and the slots {', '.join(PARTS)})")
    changes: dict[str, dict] = {}
    for key, value in values.items():
        for slot, f in targets[key]:
            check = _FIELD_TYPES.get(str(f.type))
            if check is not None and not check[0](value):
                raise ValueError(f"{key} must be {check[1]}, got {value!r}")
            changes.setdefault(slot, {})[f.name] = float(value) if str(f.type) == "float" else value
    parts = {slot: dataclasses.replace(getattr(method, slot), **c) for slot, c in changes.items()}
    return method.replace(**parts), order


def parse_method(text) -> Union[Method, MethodPlan, TimePlan, str]:
    """A method from text: a preset name; ``PRESET:KEY=VALUE[:KEY=VALUE...]`` (``,`` also separates); the path
    of a ``jaxlongvid probe --out`` JSON file (its per-layer routes as a MethodPlan); ``A~END~B[~END~C...]`` (a
    TimePlan, :func:`parse_time_plan`); or ``auto``, kept as the string for the sampler. Method, MethodPlan and
    TimePlan values pass unchanged.

    KEY is a part slot (``positions``, ``mask``, ``merge``, ``noise``) with a kind name as VALUE (``mask=window``:
    that kind's default part), or a part field (``num_groups``, ``window``, ``tiers``, ``d_t``...) set on every
    part of the method that has it (``merge.window`` names one part); VALUE is a Python literal. Slots are applied
    first. The result is named ``PRESET[KEY=VALUE,...]`` with slot keys first, then fields in part and field
    order: one spelling per variant.
    """
    if isinstance(text, (Method, MethodPlan, TimePlan)):
        return text
    if not isinstance(text, str):
        raise TypeError(f"a method must be a preset name, a spec string or a Method, got {type(text).__name__}")
    spec = text.strip()
    if spec == AUTO:
        return AUTO
    if spec.endswith(".json") or os.path.isfile(spec):
        return plan_from_probe_file(spec)
    if "~" in spec:
        return parse_time_plan(spec)
    preset, *assignments = [p.strip() for p in split_top_level(spec, ":")]
    assignments = [a.strip() for chunk in assignments for a in split_top_level(chunk, ",") if a.strip()]
    base = get_method(preset)
    if not assignments:
        return base
    if not isinstance(base, Method):
        raise ValueError(f"method spec {text!r}: {preset!r} is a plan of several methods (per layer or over time); "
                         "KEY=VALUE changes apply to single presets only")
    values: dict = {}
    try:
        for assignment in assignments:
            key, equals, value = (s.strip() for s in assignment.partition("="))
            if not (key and equals and value):
                raise ValueError(f"expected KEY=VALUE after ':', got {assignment!r}")
            if key in values:
                raise ValueError(f"field {key!r} is given twice")
            values[key] = _literal(value)
        kinds = {k: v for k, v in values.items() if k in PARTS}
        method = _with_kinds(base, kinds)
        fields = {k: v for k, v in values.items() if k not in PARTS}
        method, order = _apply_fields(method, fields) if fields else (method, [])
        keys = [s for s in PARTS if s in kinds] + order
        name = preset + "[" + ",".join(f"{k}={_format_value(values[k])}" for k in keys) + "]"
        return method.replace(name=name)
    except (ValueError, TypeError) as e:
        raise ValueError(f"method spec {text!r}: {e}") from None


def parse_time_plan(spec: str) -> TimePlan:
    """``METHOD~END~METHOD[~END~METHOD...]`` -> a :class:`TimePlan` named by the spec: each METHOD (a preset or
    a ``PRESET:KEY=VALUE`` spec) runs until the fraction END of the denoising steps, the last one to the end;
    e.g. ``longdiff:noise=freenoise~0.25~freenoise`` is the ``keepmotion`` preset."""
    parts = [p.strip() for p in spec.split("~")]
    if len(parts) % 2 == 0:
        raise ValueError(f"method spec {spec!r}: expected METHOD~END~METHOD[~END~METHOD...]")
    try:
        ends = [float(p) for p in parts[1::2]] + [1.0]
    except ValueError:
        raise ValueError(f"method spec {spec!r}: the step fractions between '~' must be numbers") from None
    methods = [parse_method(p) for p in parts[0::2]]
    if any(not isinstance(m, (Method, MethodPlan)) for m in methods):
        raise ValueError(f"method spec {spec!r}: each phase must be a single method (not auto or a time plan)")
    try:
        return TimePlan(spec, tuple(zip(ends, methods)))
    except ValueError as e:
        raise ValueError(f"method spec {spec!r}: {e}") from None


def plan_from_probe_file(path: str) -> MethodPlan:
    """The MethodPlan of a ``jaxlongvid probe --out`` file: its ``routes`` (layer path -> preset name or
    ``vrpr``); layers routed to ``direct`` run the default."""
    try:
        with open(path, encoding="utf-8") as f:
            routes = json.load(f)["routes"]
    except FileNotFoundError:
        raise ValueError(f"method file {path!r} does not exist") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"method file {path!r} is not a probe result (JSON with a 'routes' object)") from None
    if not isinstance(routes, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in routes.items()):
        raise ValueError(f"method file {path!r}: 'routes' must map layer paths to method names")
    layers = []
    for layer, name in routes.items():
        method = PROBE_ROUTES.get(name) or get_method(name)
        if method != PRESETS["direct"]:
            layers.append((layer, method))
    return MethodPlan(default=PRESETS["direct"], layers=tuple(layers), name=os.path.basename(path))

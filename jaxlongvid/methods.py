"""Long-video methods as data.

A :class:`Method` says which relative-position map, which mask and which merge a temporal attention layer
uses. It is a frozen, hashable dataclass, so it can be a static attribute of a Flax module or a static argument
of ``jax.jit``. Models never branch on method names: they pass the value to the attention core, which asks it
for its static position maps and masks.

A :class:`MethodPlan` routes methods per layer (FreeLOC's layer-adaptive routing): layer index or layer name ->
Method, with a default for the rest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from jaxlongvid import masks, positions

POSITION_MAPS = ("identity", "clip", "interpolate", "group", "group_shift", "vrpr")
MASKS = ("none", "window", "ifs", "tiered")
MERGES = ("none", "freenoise", "freelong")
NOISES = ("gaussian", "freenoise")
AUTO = "auto"  # the method name the sampler resolves per model and length (sampling.auto_method)


@dataclass(frozen=True)
class Method:
    """One temporal-attention method. Defaults reproduce the unmodified model (``direct``).

    ``None`` settings are derived from the model's native frame count N0 and the video's N (METHODS.md):
    ``num_groups = N0``, clip distance ``N0 - 1``, ``num_segments = max(1, N // N0)``, VRPR cap ``N0 - 1``.
    """

    name: str = "custom"
    positions: str = "identity"  # identity | clip | interpolate | group | group_shift | vrpr
    num_groups: int | None = None  # GROUP's G; None -> N0
    vrpr_params: tuple[int, int, int, int] = (10, 14, 2, 8)  # W1, W2, G1, G2 (FreeLOC's 4x setting)
    mask: str = "none"  # none | window | ifs | tiered
    window: int = 8  # L: local radius for window / ifs masks
    num_segments: int | None = None  # IFS segments n; None -> N // N0
    tiers: tuple[tuple[int, int], ...] = ((8, 1), (24, 4))  # (max distance, stride) for the tiered mask
    sink_frames: int = 1  # frames every query sees under the tiered mask
    merge: str = "none"  # none | freenoise | freelong
    context_window: int = 16  # FreeNoise window W
    context_stride: int = 4  # FreeNoise stride S
    local_window: int = 8  # FreeLong local branch radius (windows 2r+1 wide)
    freelong_d_t: float = 0.25  # FreeLong low-pass stop frequency over frames
    freelong_d_s: float = 0.25  # ... and over height/width
    noise: str = "gaussian"  # gaussian | freenoise (initial noise rescheduling)

    def __post_init__(self):
        for attr, allowed in (("positions", POSITION_MAPS), ("mask", MASKS), ("merge", MERGES),
                              ("noise", NOISES)):
            value = getattr(self, attr)
            if value not in allowed:
                raise ValueError(f"Method.{attr} must be one of {allowed}, got {value!r}")
        for attr in ("window", "sink_frames"):
            if getattr(self, attr) < 0:
                raise ValueError(f"Method.{attr} must be >= 0, got {getattr(self, attr)}")
        for attr in ("context_window", "context_stride", "local_window"):
            if getattr(self, attr) < 1:
                raise ValueError(f"Method.{attr} must be >= 1, got {getattr(self, attr)}")
        if self.num_groups is not None and self.num_groups < 2:
            raise ValueError(f"Method.num_groups must be >= 2, got {self.num_groups}")
        if self.num_segments is not None and self.num_segments < 1:
            raise ValueError(f"Method.num_segments must be >= 1, got {self.num_segments}")
        if self.merge != "none" and self.mask == "ifs":
            raise ValueError(f"Method.merge={self.merge!r} cannot be combined with mask='ifs'")
        object.__setattr__(self, "tiers", tuple(tuple(int(x) for x in t) for t in self.tiers))
        object.__setattr__(self, "vrpr_params", tuple(int(x) for x in self.vrpr_params))

    def replace(self, **changes) -> "Method":
        return dataclasses.replace(self, **changes)

    # ---- static parts, derived from the frame count N and the native count N0 -------------------------
    def position_maps(self, num_frames: int, native_frames: int) -> np.ndarray:
        """Relative-position maps ``[M, N, N]`` (M > 1 only for GROUP+SHIFT). Identity when N <= N0."""
        n, n0 = num_frames, native_frames
        kind = self.positions
        if kind == "identity" or n <= n0:
            return positions.identity(n)[None]
        if kind == "clip":
            return positions.clip(n, n0 - 1)[None]
        if kind == "interpolate":
            return positions.interpolate(n, n0)[None]
        g = self.num_groups or n0
        if n <= g:
            return positions.identity(n)[None]
        if kind == "group":
            return positions.group(n, g)[None]
        if kind == "group_shift":
            return positions.group_shift(n, g)
        w1, w2, g1, g2 = self.vrpr_params
        return positions.vrpr(n, w1, w2, g1, g2, n0 - 1)[None]

    def static_mask(self, num_frames: int) -> np.ndarray | None:
        """The part of the mask known before run time (``None``: all keys visible)."""
        if self.mask == "window":
            return masks.window(num_frames, self.window)
        if self.mask == "tiered":
            return masks.tiered(num_frames, self.tiers, self.sink_frames)
        return None

    @property
    def needs_keyframes(self) -> bool:
        return self.mask == "ifs"

    def segments(self, num_frames: int, native_frames: int) -> int:
        """IFS segment count n for this video."""
        return min(num_frames, self.num_segments or max(1, num_frames // native_frames))


@dataclass(frozen=True)
class MethodPlan:
    """Per-layer routing: ``layers`` pairs a temporal-attention layer's index or name with its Method."""

    default: Method = field(default_factory=Method)
    layers: tuple[tuple[Union[int, str], Method], ...] = ()

    def for_layer(self, index: int, name: str = "") -> Method:
        for key, method in self.layers:
            if key == index or key == name:
                return method
        return self.default

    @property
    def noise(self) -> str:
        return self.default.noise


@dataclass(frozen=True)
class TimePlan:
    """Methods scheduled over denoising time: ``phases`` pairs the fraction of the steps at which a phase ends
    with the Method (or MethodPlan) it runs, e.g. ``((0.4, longdiff), (1.0, freenoise))``: LongDiff for the
    first 40% of the steps (high noise), FreeNoise for the rest. Fractions increase strictly and the last is 1.
    The initial noise is the first phase's (its ``noise`` setting). The sampler resolves the phases to step
    ranges once (``sampling.resolve_phases``) and runs one loop per phase with that phase's static method."""

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
    def noise(self) -> str:
        return self.phases[0][1].noise

    @property
    def first(self) -> Union[Method, MethodPlan]:
        """The first phase's method: it decides the initial noise."""
        return self.phases[0][1]


PRESETS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("direct"),
        Method("freenoise", merge="freenoise", noise="freenoise"),
        Method("freelong", merge="freelong", noise="freenoise"),
        Method("sliding-window", mask="window"),
        Method("longdiff", positions="group_shift", mask="ifs"),
        Method("longdiff-no-pm", mask="ifs"),
        Method("longdiff-no-ifs", positions="group_shift"),
        Method("clip", positions="clip", mask="ifs"),
        Method("interpolate", positions="interpolate", mask="ifs"),
        Method("group-only", positions="group", mask="ifs"),
        Method("freeloc", positions="vrpr", mask="tiered"),
    )
}


# Methods scheduled over denoising time (issue 17), by name like the presets. "keepmotion": LongDiff's grouped
# positions and IFS for the first quarter of the steps (high noise: the global layout, one subject), then
# FreeNoise's exact local positions and window fusion (low noise: motion at the trained speed), from FreeNoise's
# rescheduled initial noise. The choice of the switch point: docs/motion.md.
TIME_PRESETS: dict[str, TimePlan] = {
    t.name: t
    for t in (
        TimePlan("keepmotion", ((0.25, PRESETS["longdiff"].replace(noise="freenoise")),
                                (1.0, PRESETS["freenoise"]))),
    )
}


def get_method(method):
    """A preset name (:data:`PRESETS`, :data:`TIME_PRESETS`), a Method, a MethodPlan or a TimePlan -> the value
    (names are checked; ``"auto"`` needs the model and length: ``sampling.auto_method``)."""
    if isinstance(method, (Method, MethodPlan, TimePlan)):
        return method
    if isinstance(method, str):
        if method in PRESETS:
            return PRESETS[method]
        if method in TIME_PRESETS:
            return TIME_PRESETS[method]
        raise ValueError(f"unknown method {method!r}; presets are {sorted(PRESETS) + sorted(TIME_PRESETS)}"
                         + (" ('auto' is resolved by the sampler for a model and length)" if method == "auto" else ""))
    raise TypeError(f"method must be a preset name, Method, MethodPlan or TimePlan, got {type(method).__name__}")


def method_for_layer(method, index: int, name: str = "") -> Method:
    """The Method that temporal-attention layer ``index`` (``name``) runs under ``method``."""
    method = get_method(method)
    return method.for_layer(index, name) if isinstance(method, MethodPlan) else method

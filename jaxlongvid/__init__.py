"""jaxlongvid: training-free long video generation in JAX."""

__version__ = "0.1.0"

from jaxlongvid.methods import Method, MethodPlan, PRESETS  # noqa: E402,F401

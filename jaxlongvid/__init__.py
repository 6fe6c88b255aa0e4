"""jaxlongvid: training-free long video generation in JAX.

    import jaxlongvid as jlv
    pipe = jlv.load("tiny")
    video = jlv.sample(pipe, "a red circle bouncing", num_frames=128, method="longdiff", seed=0)
    jlv.save_video(video, "out.mp4", fps=8)

The names below are imported on first use (PEP 562), so ``import jaxlongvid`` (and the ``jaxlongvid`` command's
``--help`` / ``--version``) does not start JAX.
"""

import importlib

__version__ = "0.1.0"

_NAMES = {
    "PRESETS": "jaxlongvid.methods", "TIME_PRESETS": "jaxlongvid.methods", "Method": "jaxlongvid.methods",
    "MethodPlan": "jaxlongvid.methods", "TimePlan": "jaxlongvid.methods",
    "Pipeline": "jaxlongvid.pipeline", "PipelineConfig": "jaxlongvid.pipeline", "load": "jaxlongvid.pipeline",
    "save": "jaxlongvid.pipeline", "sample": "jaxlongvid.sampling", "SchedulerConfig": "jaxlongvid.schedulers",
    "save_video": "jaxlongvid.video",
}
__all__ = ["__version__", *_NAMES]


def __getattr__(name):
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jaxlongvid' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_NAMES))

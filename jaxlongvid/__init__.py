"""jaxlongvid: training-free long video generation in JAX.

    import jaxlongvid as jlv
    pipe = jlv.load("tiny")
    video = jlv.sample(pipe, "a red circle bouncing", num_frames=128, method="longdiff", seed=0)
    jlv.save_video(video, "out.mp4", fps=8)
"""

__version__ = "0.1.0"

from jaxlongvid.methods import PRESETS, TIME_PRESETS, Method, MethodPlan, TimePlan  # noqa: E402,F401
from jaxlongvid.pipeline import Pipeline, PipelineConfig, load, save  # noqa: E402,F401
from jaxlongvid.sampling import sample  # noqa: E402,F401
from jaxlongvid.schedulers import SchedulerConfig  # noqa: E402,F401
from jaxlongvid.video import save_video  # noqa: E402,F401

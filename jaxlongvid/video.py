"""Writing videos: ``.mp4`` (H.264 through imageio-ffmpeg), ``.gif``, and ``.png`` contact sheets.

Videos are NumPy uint8 ``[frames, height, width, 3]``, as :func:`jaxlongvid.sample` returns them. Every write is
atomic (:func:`jaxlongvid.files.atomic_file`): the file is written under a temporary name in the same folder and
renamed over ``path`` only when complete, so a killed write leaves the previous file intact.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np

from jaxlongvid import files

FORMATS = (".mp4", ".gif", ".png")


def check_video(video) -> np.ndarray:
    """``video`` as uint8 ``[F, H, W, 3]`` (a batch of one is accepted), or a clear error."""
    video = np.asarray(video)
    if video.ndim == 5 and video.shape[0] == 1:
        video = video[0]
    if video.ndim != 4 or video.shape[-1] != 3:
        hint = " (a batch: save each video separately)" if video.ndim == 5 else ""
        raise ValueError(f"video must be [frames, height, width, 3], got shape {video.shape}{hint}")
    if video.dtype != np.uint8:
        raise ValueError(f"video must be uint8 (as jaxlongvid.sample returns it), got {video.dtype}")
    if video.shape[0] < 1 or video.shape[1] < 1 or video.shape[2] < 1:
        raise ValueError(f"video is empty: shape {video.shape}")
    return video


def contact_sheet(video, every: int = 1, columns: int | None = None, gap: int = 2) -> np.ndarray:
    """Frames ``0, every, 2 every, ...`` tiled row by row into one uint8 image ``[rows*H + gaps, cols*W + gaps, 3]``.

    ``columns`` defaults to about the square root of the frame count; tiles are separated by ``gap`` white pixels.
    """
    video = check_video(video)
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"every must be an int >= 1, got {every!r}")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    frames = video[::every]
    n, h, w, _ = frames.shape
    cols = columns if columns is not None else math.ceil(math.sqrt(n))
    if isinstance(cols, bool) or not isinstance(cols, (int, np.integer)) or cols < 1:
        raise ValueError(f"columns must be an int >= 1, got {columns!r}")
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    sheet = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 255, np.uint8)
    for i, frame in enumerate(frames):
        r, c = divmod(i, cols)
        sheet[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = frame
    return sheet


def save_contact_sheet(video, path, every: int = 1, columns: int | None = None, gap: int = 2) -> str:
    """Write :func:`contact_sheet` as a PNG; returns the path."""
    import imageio.v3 as iio

    path = os.fspath(path)
    sheet = contact_sheet(video, every, columns, gap)
    with files.atomic_file(path) as tmp:
        iio.imwrite(tmp, sheet, extension=".png")
    return path


def save_video(video, path, fps: float = 8, every: int | None = None, quality: int = 8) -> str:
    """Write ``video`` to ``path`` by its extension; returns the path.

    ``.mp4``: H.264 (yuv420p) at ``fps`` via imageio-ffmpeg, ``quality`` 0-10; odd heights or widths are padded
    by one repeated edge row / column, which yuv420p needs. ``.gif``: every frame at ``fps``, looping.
    ``.png``: a contact sheet of every ``every``-th frame (default: about 16 frames in all).
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"unsupported video format {ext or '(none)'!r} for {path}; use one of {FORMATS}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    video = check_video(video)
    files.check_output_file(path, "video path")
    if ext == ".png":
        step = every if every is not None else max(1, math.ceil(video.shape[0] / 16))
        return save_contact_sheet(video, path, every=step)
    if ext == ".gif":
        import imageio.v3 as iio

        with files.atomic_file(path) as tmp:
            iio.imwrite(tmp, video, extension=".gif", duration=1000.0 / fps, loop=0)
        return path
    import imageio.v2 as imageio

    pad_h, pad_w = video.shape[1] % 2, video.shape[2] % 2
    if pad_h or pad_w:
        video = np.pad(video, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with files.atomic_file(path) as tmp, warnings.catch_warnings():
        # imageio-ffmpeg starts ffmpeg with subprocess (fork + exec at once: none of JAX's threads run in the
        # child), which Python 3.12+ flags in a multithreaded process; the warning does not apply here
        warnings.filterwarnings("ignore", message=r".*os\.fork\(\) was called", category=RuntimeWarning)
        writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=quality,
                                    pixelformat="yuv420p", macro_block_size=1)
        try:
            for frame in video:
                writer.append_data(frame)
        finally:
            writer.close()
    return path

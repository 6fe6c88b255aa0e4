"""Writing videos: mp4 (H.264 via imageio-ffmpeg), gif and png contact sheets, read back and compared."""

import imageio.v2 as imageio
import imageio.v3 as iio
import numpy as np
import pytest

from jaxlongvid.video import contact_sheet, save_contact_sheet, save_video


def smooth_video(frames=12, height=32, width=48):
    """A moving gradient: smooth, so H.264 keeps it close."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    r = 127.5 + 100 * np.sin((x + 2 * t) / 8.0)
    g = 127.5 + 100 * np.cos((y - t) / 6.0)
    b = np.broadcast_to(40.0 + 10 * t[..., None][..., 0], r.shape)
    return np.stack([r, g, b], -1).round().astype(np.uint8)


def test_mp4_round_trip(tmp_path):
    video = smooth_video()
    path = save_video(video, tmp_path / "v.mp4", fps=12)
    reader = imageio.get_reader(path)
    meta = reader.get_meta_data()
    frames = np.stack([f for f in reader.iter_data()])
    reader.close()
    assert meta["fps"] == 12 and meta["codec"] == "h264"
    assert frames.shape == video.shape
    err = np.mean(np.abs(frames.astype(float) - video), axis=(1, 2, 3))
    assert err.max() < 6  # lossy (4:2:0 chroma), but the same pictures ...
    wrong_order = np.mean(np.abs(frames.astype(float) - video[::-1]), axis=(1, 2, 3))
    assert np.all(wrong_order[:5] > 4 * err[:5])  # ... in the same order


def test_mp4_pads_odd_sizes(tmp_path):
    video = smooth_video(4, 15, 21)
    reader = imageio.get_reader(save_video(video, tmp_path / "odd.mp4"))
    frames = np.stack([f for f in reader.iter_data()])
    reader.close()
    assert frames.shape == (4, 16, 22, 3)  # yuv420p needs even sizes: one repeated edge row and column
    assert np.mean(np.abs(frames[:, :15, :21].astype(float) - video)) < 6


def test_gif_round_trip(tmp_path):
    video = np.zeros((6, 10, 12, 3), np.uint8)
    for i in range(6):  # few colours: the GIF palette keeps them exactly
        video[i, :, : 2 * i] = (200, 30, 30)
        video[i, 5:, :] = (10, 200 - 20 * i, 90)
    path = save_video(video, tmp_path / "v.gif", fps=10)
    np.testing.assert_array_equal(iio.imread(path, index=None), video)
    meta = iio.immeta(path)
    assert meta["duration"] == 100 and meta["loop"] == 0


def test_contact_sheet_layout():
    video = np.stack([np.full((4, 5, 3), i, np.uint8) for i in range(10)])
    sheet = contact_sheet(video, every=3, columns=2, gap=1)  # frames 0, 3, 6, 9 on 2 x 2
    assert sheet.shape == (2 * 4 + 1, 2 * 5 + 1, 3)
    assert sheet[0, 0, 0] == 0 and sheet[0, 6, 0] == 3 and sheet[5, 0, 0] == 6 and sheet[5, 6, 0] == 9
    assert np.all(sheet[4, :] == 255) and np.all(sheet[:, 5] == 255)  # white gaps
    assert contact_sheet(video).shape == (3 * 4 + 2 * 2, 4 * 5 + 3 * 2, 3)  # 10 frames: 4 columns, 3 rows
    three = contact_sheet(video[:3], columns=8, gap=0)  # columns capped at the frame count
    assert three.shape == (4, 15, 3)


def test_png_contact_sheet(tmp_path):
    video = smooth_video(32, 8, 8)
    path = save_video(video, tmp_path / "sheet.png")  # default: about 16 frames, here every 2nd
    np.testing.assert_array_equal(iio.imread(path), contact_sheet(video, every=2))
    path = save_contact_sheet(video, tmp_path / "s4.png", every=4, columns=8)
    sheet = iio.imread(path)
    np.testing.assert_array_equal(sheet[:, 10 * 3:10 * 3 + 8], video[12])


@pytest.mark.parametrize("video,error", [
    (np.zeros((4, 8, 8), np.uint8), "frames, height, width, 3"),
    (np.zeros((2, 4, 8, 8, 3), np.uint8), "a batch: save each video separately"),
    (np.zeros((4, 8, 8, 3), np.float32), "must be uint8"),
    (np.zeros((0, 8, 8, 3), np.uint8), "empty"),
])
def test_bad_videos(tmp_path, video, error):
    with pytest.raises(ValueError, match=error):
        save_video(video, tmp_path / "v.gif")


def test_bad_paths_and_settings(tmp_path):
    video = smooth_video(2, 8, 8)
    with pytest.raises(ValueError, match="unsupported video format '.avi'"):
        save_video(video, tmp_path / "v.avi")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_video(video, tmp_path / "missing" / "v.gif")
    with pytest.raises(ValueError, match="fps must be > 0"):
        save_video(video, tmp_path / "v.gif", fps=0)
    with pytest.raises(ValueError, match="every must be"):
        contact_sheet(video, every=0)
    assert save_video(video[None], tmp_path / "one.gif")  # a batch of one is fine

"""The procedural data set of the tiny model: rendering, ground truth, motion laws, captions and speed."""

import dataclasses
import time

import numpy as np
import pytest

from jaxlongvid.tiny import data, vocab

DD_THRESHOLD = 6.0 / 256.0  # VBench's dynamic-degree threshold, fraction of the side per frame at 8 fps


def _scenes(n, seed=0, frames=16, num_objects=None):
    rng = np.random.default_rng(seed)
    return [data.random_scene(rng, frames, num_objects) for _ in range(n)]


def _scene_with_motion(motion, seed, frames=16, shape="circle"):
    rng = np.random.default_rng(seed)
    obj = data.random_object(rng, "red", shape, motion, frames)
    return data.Scene((obj,), "black")


def _chroma(video):
    v = video.astype(np.int16)
    return v.max(-1) - v.min(-1)


def test_sample_batch_shapes_dtypes_and_determinism():
    videos, captions, truth = data.sample_batch(3, 8, frames=16, size=32)
    assert videos.shape == (8, 16, 32, 32, 3) and videos.dtype == np.uint8
    assert len(captions) == 8 and all(isinstance(c, str) for c in captions)
    again, captions_again, _ = data.sample_batch(3, 8, frames=16, size=32)
    np.testing.assert_array_equal(videos, again)
    assert captions == captions_again
    other, _, _ = data.sample_batch(4, 8, frames=16, size=32)
    assert not np.array_equal(videos, other)
    floats, _, _ = data.sample_batch(3, 8, frames=16, size=32, dtype="float32")
    assert floats.dtype == np.float32 and floats.min() >= -1.0 and floats.max() <= 1.0
    np.testing.assert_allclose(floats, videos / 127.5 - 1.0, atol=1e-6)
    assert truth["positions"].shape == (8, 2, 16, 2)
    assert truth["colour"].shape == truth["shape"].shape == truth["motion"].shape == (8, 2)
    for i, scene in enumerate(truth["scenes"]):
        assert truth["num_objects"][i] == len(scene.objects)
        assert vocab.BACKGROUNDS[truth["background"][i]] == scene.background
        for j in range(2):
            if j < len(scene.objects):
                obj = scene.objects[j]
                assert list(vocab.COLOURS)[truth["colour"][i, j]] == obj.colour
                assert vocab.SHAPES[truth["shape"][i, j]] == obj.shape
                assert list(vocab.MOTIONS)[truth["motion"][i, j]] == obj.motion
            else:  # padding of one-object scenes
                assert truth["colour"][i, j] == -1 and np.isnan(truth["positions"][i, j]).all()


def test_sample_batch_is_fast():
    data.sample_batch(0, 16)  # warm up
    best = min(_timed(lambda: data.sample_batch(seed, 256, frames=16, size=32)) for seed in range(3))
    assert best < 1.0, f"256 clips of 16x32x32x3 took {best:.2f} s"


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_long_render_continues_the_short_clip():
    for motion in vocab.MOTIONS:
        scene = _scene_with_motion(motion, seed=1, shape="checkered square")
        scene = dataclasses.replace(scene, background="textured", background_seed=7)
        np.testing.assert_array_equal(data.render(scene, 128, 32)[:16], data.render(scene, 16, 32))


@pytest.mark.parametrize("size", [32, 64])
def test_truth_positions_are_the_rendered_centroids(size):
    """Coverage-weighted centroid of the object's pixels (chroma is coverage over grey) equals the truth."""
    worst = 0.0
    for scene in _scenes(40, seed=size, num_objects=1):
        video = data.render(scene, 16, size)
        truth = data.ground_truth([scene], 16, size)["positions"][0, 0]
        weight = _chroma(video).astype(np.float64)
        centres = np.arange(size) + 0.5
        cx = (weight * centres[None, None, :]).sum((1, 2)) / weight.sum((1, 2))
        cy = (weight * centres[None, :, None]).sum((1, 2)) / weight.sum((1, 2))
        worst = max(worst, np.abs(np.stack([cx, cy], -1) - truth).max())
    assert worst < 0.15, worst  # measured 0.06 px at 32 and 64


def test_objects_are_separable_from_backgrounds():
    """Backgrounds are grey (chroma 0); object cores have chroma >= 127 and their vocab hue."""
    for scene in _scenes(60, seed=5):
        video = data.render(scene, 16, 32)
        truth = data.ground_truth([scene], 16, 32)
        chroma = _chroma(video)
        centres = np.arange(32) + 0.5
        near_any = np.zeros(chroma.shape, bool)
        for j, obj in enumerate(scene.objects):
            pos = truth["positions"][0, j]
            dx = np.mod(centres[None, None, :] - pos[:, 0, None, None] + 16, 32) - 16
            dy = np.mod(centres[None, :, None] - pos[:, 1, None, None] + 16, 32) - 16
            distance = np.sqrt(dx * dx + dy * dy)
            near_any |= distance < obj.extent * 32 * 1.55 + 1.0
            core = distance < 0.4 * obj.extent * 32
            assert chroma[core].min() >= 127
            rgb = video[core].astype(np.float64)
            expected = np.asarray(vocab.COLOURS[obj.colour], np.float64)
            cosine = rgb @ expected / (np.linalg.norm(rgb, axis=1) * np.linalg.norm(expected))
            assert cosine.min() > 0.999, (obj.colour, cosine.min())
        assert chroma[~near_any].max() == 0


def test_motion_laws():
    frames = 16
    for seed in range(30):
        still = _scene_with_motion("still", seed).objects[0]
        path = data.trajectory(still, frames)
        assert np.ptp(path, axis=0).max() == 0

        for direction, unit in (("left", (-1, 0)), ("right", (1, 0)), ("up", (0, -1)), ("down", (0, 1))):
            obj = _scene_with_motion(direction, seed).objects[0]
            steps = np.diff(data.trajectory(obj, frames), axis=0)
            speed = np.linalg.norm(obj.velocity)
            np.testing.assert_allclose(steps, np.broadcast_to(speed * np.asarray(unit), steps.shape), atol=1e-12)
            assert data.LINEAR_SPEED[0] <= speed <= data.LINEAR_SPEED[1] and speed > DD_THRESHOLD

        obj = _scene_with_motion("bouncing", seed).objects[0]
        steps = np.diff(data.trajectory(obj, frames), axis=0)
        flips = [np.nonzero(np.sign(steps[1:, a]) != np.sign(steps[:-1, a]))[0] + 1 for a in range(2)]
        assert any(((f >= 2) & (f <= len(steps) - 2)).any() for f in flips), "no bounce inside the clip"
        assert np.all(np.abs(steps) <= np.abs(obj.velocity) + 1e-12)
        assert min(np.abs(obj.velocity)) >= data.BOUNCE_SPEED[0]

        obj = _scene_with_motion("circling", seed).objects[0]
        path = data.trajectory(obj, 64)
        radius = np.linalg.norm(path - np.asarray(obj.start), axis=1)
        np.testing.assert_allclose(radius, obj.radius, atol=1e-9)
        angle = np.unwrap(np.arctan2(path[:, 1] - obj.start[1], path[:, 0] - obj.start[0]))
        np.testing.assert_allclose(np.diff(angle), 2 * np.pi / obj.period, atol=1e-9)
        assert 2 * np.pi * obj.radius / abs(obj.period) > DD_THRESHOLD


@pytest.mark.parametrize("shape", vocab.SHAPES)
def test_objects_stay_whole_in_frame(shape):
    """Every motion keeps the bounding box in frame over the planned clip (and at any length unless linear);
    the box from `margins` is checked against the rendered pixels."""
    for seed in range(20):
        for motion in vocab.MOTIONS:
            obj = _scene_with_motion(motion, seed, shape=shape).objects[0]
            low, high = data.margins(shape, obj.extent)
            path = data.trajectory(obj, 16 if motion in vocab.LINEAR_MOTIONS else 200)
            assert np.all(path - low >= -1e-9) and np.all(path + high <= 1 + 1e-9), (shape, motion, seed)
    obj = data.SceneObject("red", shape, "still", 0.2, (0.5, 0.5))
    chroma = _chroma(data.render(data.Scene((obj,), "black"), 1, 64)[0])
    ys, xs = np.nonzero(chroma > 0)
    low, high = data.margins(shape, 0.2)
    np.testing.assert_allclose([xs.min(), ys.min()], np.floor(64 * (0.5 - low)), atol=1)
    np.testing.assert_allclose([xs.max() + 1, ys.max() + 1], np.ceil(64 * (0.5 + high)), atol=1)


def test_long_linear_motion_wraps_on_the_torus():
    obj = _scene_with_motion("right", 2).objects[0]
    path = data.trajectory(obj, 256)
    assert path.min() >= 0 and path.max() < 1
    unwrapped = np.unwrap(path[:, 0], period=1.0)
    np.testing.assert_allclose(np.diff(unwrapped), obj.velocity[0], atol=1e-12)


def test_two_objects_are_distinct_and_kept_apart():
    scenes = [s for s in _scenes(300, seed=9) if len(s.objects) == 2]
    assert 0.1 < len(scenes) / 300 < 0.35  # "sometimes two objects"
    for scene in scenes:
        a, b = scene.objects
        assert a.colour != b.colour
        gap = np.mod(data.trajectory(a, 16) - data.trajectory(b, 16) + 0.5, 1.0) - 0.5
        assert np.linalg.norm(gap, axis=1).min() > a.extent + b.extent


def test_captions_round_trip_through_the_parser():
    words = set(vocab.WORDS)
    for scene in _scenes(200, seed=11):
        for with_background in (True, False):
            text = data.caption(scene, with_background)
            assert set(text.split()) <= words
            spec = data.parse_prompt(text)
            assert spec.background == (scene.background if with_background else None)
            assert [(o.colour, o.shape, o.motion) for o in spec.objects] == [
                (o.colour, o.shape, o.motion) for o in scene.objects]
    assert data.caption(_scene_with_motion("bouncing", 0, shape="triangle")) == (
        "a red triangle bouncing on a black background")


def test_parse_prompt_reads_partial_prompts_and_rejects_bad_ones():
    spec = data.parse_prompt("A red circle bouncing")
    assert spec == data.PromptSpec((data.ObjectSpec("red", "circle", "bouncing"),), None)
    spec = data.parse_prompt("a blue checkered square, standing still, on a striped background.")
    assert spec == data.PromptSpec((data.ObjectSpec("blue", "checkered square", "still"),), "striped")
    assert data.parse_prompt("a green diamond").objects[0].motion is None
    with pytest.raises(ValueError, match="'purple'"):
        data.parse_prompt("a purple circle")
    with pytest.raises(ValueError, match="no shape"):
        data.parse_prompt("a red bouncing")
    with pytest.raises(ValueError, match="before any colour"):
        data.parse_prompt("a circle")
    with pytest.raises(ValueError, match="no object colour"):
        data.parse_prompt("on a black background")
    with pytest.raises(ValueError, match="string"):
        data.parse_prompt(None)


def test_scene_from_prompt_follows_the_prompt():
    rng = np.random.default_rng(0)
    for text in ("a cyan diamond circling on a gradient background", "a yellow square",
                 "a red circle moving up and a blue triangle standing still on a white background"):
        spec = data.parse_prompt(text)
        for _ in range(5):
            scene = data.scene_from_prompt(text, rng)
            assert spec.background in (None, scene.background)
            for want, got in zip(spec.objects, scene.objects):
                assert (want.colour, want.shape) == (got.colour, got.shape)
                assert want.motion in (None, got.motion)


def test_patterned_shape_has_two_intensities_in_cells():
    # extent chosen so that the 4 x 4 cells are 4 pixels wide and fall on pixel boundaries
    extent = 4 * data._CHECKER_CELLS / 2 / data._SQUARE_HALF_SIDE / 64
    obj = data.SceneObject("green", "checkered square", "still", extent, (0.5, 0.5))
    frame = data.render(data.Scene((obj,), "black"), 1, 64)[0]
    inner = frame[24:40, 24:40, 1]
    assert set(np.unique(inner).tolist()) == {128, 255}
    cells = inner.reshape(4, 4, 4, 4).transpose(0, 2, 1, 3).reshape(4, 4, 16)
    assert np.all(cells.min(-1) == cells.max(-1))  # each cell is flat
    expected = np.where((np.arange(4)[:, None] + np.arange(4)[None, :]) % 2 == 0, 255, 128)
    np.testing.assert_array_equal(cells[..., 0], expected)  # alternating, bright in the corner
    assert np.all(frame[:, :, [0, 2]] == 0)


def test_resolution_free_scenes():
    for scene in _scenes(10, seed=13):
        small, large = data.ground_truth([scene], 16, 32), data.ground_truth([scene], 16, 64)
        np.testing.assert_allclose(large["positions"], 2 * small["positions"], rtol=1e-6, equal_nan=True)
        # the 64-pixel render, averaged over 2x2 blocks, is the 32-pixel render up to edge anti-aliasing
        big = data.render(scene, 4, 64).astype(np.float64)
        pooled = big.reshape(4, 32, 2, 32, 2, 3).mean((2, 4))
        assert np.abs(pooled - data.render(scene, 4, 32)).mean() < 6.0


def test_invalid_scenes_are_rejected():
    with pytest.raises(ValueError, match="colour"):
        data.SceneObject("purple", "circle", "still", 0.2, (0.5, 0.5))
    with pytest.raises(ValueError, match="extent"):
        data.SceneObject("red", "circle", "still", 0.7, (0.5, 0.5))
    with pytest.raises(ValueError, match="circling"):
        data.SceneObject("red", "circle", "circling", 0.2, (0.5, 0.5))
    red = data.SceneObject("red", "circle", "still", 0.2, (0.3, 0.3))
    with pytest.raises(ValueError, match="distinct colours"):
        data.Scene((red, red), "black")
    with pytest.raises(ValueError, match="background"):
        data.Scene((red,), "plaid")
    with pytest.raises(ValueError, match="batch"):
        data.sample_batch(0, 0)
    with pytest.raises(ValueError, match="dtype"):
        data.sample_batch(0, 1, dtype="float16")

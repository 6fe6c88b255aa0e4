"""ShapesBench runner: batching and its noise scheme, resuming, pooled scoring, method specs, outputs.

Most tests use a fake sampler whose video for a prompt depends on (prompt, call seed, row in the call, method)
exactly as the real one's noise does, so the bookkeeping (which row is which prompt, which seed each chunk
gets, what a rerun samples) is checked without a model; the last test runs the bundled tiny model.
"""

import argparse
import csv
import json
import os
import time

import numpy as np
import pytest

import jaxlongvid
from jaxlongvid.bench import metrics, runner
from jaxlongvid.methods import IFS, PRESETS, GroupShift, Method, MethodPlan
from jaxlongvid.tiny import data

FRAMES = 16
QUIET = dict(log=lambda _: None, workers=1)


def fake_video(prompt, seed, row, method, frames, size=32):
    """The fake sampler's video: the prompt's scene drawn with an rng of (call seed, row); 'direct' scrambles
    time and 'sliding-window' variants drop a frame's worth of motion, so methods score differently."""
    rng = np.random.default_rng([seed, row])
    video = data.render(data.scene_from_prompt(prompt, rng), frames, size)
    if method.name == "direct":
        video = video[rng.permutation(frames)]
    return video


class FakeSampler:
    def __init__(self, fail_after=None, sleep=0.0):
        self.calls, self.fail_after, self.sleep = [], fail_after, sleep

    def __call__(self, pipe, prompts, num_frames, method, seed, **kwargs):
        assert isinstance(prompts, list) and isinstance(method, Method)
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("device command killed")
        self.calls.append({"prompts": list(prompts), "frames": num_frames, "method": method, "seed": seed,
                           "kwargs": kwargs})
        time.sleep(self.sleep)
        return np.stack([fake_video(p, seed, row, method, num_frames) for row, p in enumerate(prompts)])


def read_rows(out):
    with open(os.path.join(out, "results.csv"), newline="") as f:
        return list(csv.DictReader(f))


def keyed(rows):
    """{(method, frames, prompt, seed): metric strings}: a run's content, without timings or order."""
    return {(r["method"], int(r["frames"]), r["prompt"], int(r["seed"])): tuple(str(r[m]) for m in metrics.METRICS)
            for r in rows}


# ---- method specs -----------------------------------------------------------------------------------------


def test_method_lists_parse_each_spec():
    """``--methods``: specs split at top-level commas, each read by ``methods.parse_method`` (tested with the
    methods); tuple values keep their commas."""
    listed = runner.parse_methods("direct, longdiff:num_groups=8:window=4,freeloc:tiers=((8,1), (32,4)),")
    assert [runner.method_label(x) for x in listed] == [
        "direct", "longdiff[num_groups=8,window=4]", "freeloc[tiers=((8,1),(32,4))]"]
    assert listed[2].mask.tiers == ((8, 1), (32, 4))
    with pytest.raises(ValueError, match="method spec 'longdiff:window=4.5'.*window must be an integer"):
        runner.parse_methods("direct,longdiff:window=4.5")
    with pytest.raises(ValueError, match="no methods"):
        runner.parse_methods(" , ")


def test_per_layer_plans_are_named_by_their_preset_or_file(tmp_path):
    """Two probe files with the same default are two rows: a plan's label is its preset name or its file's name."""
    layer = "down_blocks_1/attentions_0/transformer_blocks_0/attn_temp"
    for stem, route in (("a", "longdiff"), ("b", "freeloc")):
        (tmp_path / f"{stem}.json").write_text(json.dumps({"routes": {layer: route}}))
    listed = runner.parse_methods(f"{tmp_path / 'a.json'},{tmp_path / 'b.json'},freeloc-wan")
    assert [runner.method_label(x) for x in listed] == ["a.json", "b.json", "freeloc-wan"]
    assert [x.resolve((layer,)).name for x in listed[:2]] == ["a.json", "b.json"]  # kept by resolve
    assert runner.method_label(MethodPlan(default=PRESETS["longdiff"])) == "plan[longdiff]"


def test_overridden_method_reaches_the_sampler_and_names_the_rows(tmp_path):
    sampler = FakeSampler()
    rows = runner.run_shapes_bench(None, ["longdiff", "longdiff:window=4:num_groups=8"], [FRAMES],
                                   runner.prompts(2), [0], str(tmp_path), sample_fn=sampler, reference=False,
                                   **QUIET)
    seen = [c["method"] for c in sampler.calls]
    assert seen == [PRESETS["longdiff"], Method("longdiff[num_groups=8,window=4]", positions=GroupShift(8),
                                                mask=IFS(window=4))]
    assert [r["method"] for r in read_rows(tmp_path)] == ["longdiff"] * 2 + ["longdiff[num_groups=8,window=4]"] * 2
    assert len(rows) == 4 and (tmp_path / "sheets" / "longdiff_num_groups=8_window=4_16f.png").exists()
    with pytest.raises(ValueError, match="distinct"):
        runner.run_shapes_bench(None, ["longdiff", "longdiff"], [FRAMES], runner.prompts(2), [0], str(tmp_path),
                                sample_fn=sampler, **QUIET)


# ---- batching and seeds -----------------------------------------------------------------------------------


def test_chunks_and_their_seeds():
    assert runner.chunks_to_sample({0, 1, 2, 3, 4}, 5, 5) == [(0, [0, 1, 2, 3, 4])]
    assert runner.chunks_to_sample({1, 4}, 5, 2) == [(0, [0, 1]), (2, [4])]  # whole chunks, done prompts too
    assert runner.chunks_to_sample(set(), 5, 2) == []
    assert runner.chunk_seed(3, 0) == 3 and runner.chunk_seed(3, 2) == 2_000_003


@pytest.mark.parametrize("batch", [None, 2])
def test_one_call_per_chunk_and_rows_follow_the_noise_scheme(tmp_path, batch):
    """Each (frames, method, seed) samples its prompts in chunks of ``batch``, one call each, at the chunk's
    seed; the row of prompt p is the video of its position in its chunk's call."""
    texts, seeds = runner.prompts(5), [0, 1]
    sampler = FakeSampler()
    runner.run_shapes_bench(None, ["direct", "longdiff"], [FRAMES, 24], texts, seeds, str(tmp_path),
                            steps=3, batch=batch, sample_fn=sampler, **QUIET)
    size = 5 if batch is None else batch
    chunks = [texts[i:i + size] for i in range(0, 5, size)]
    expected_calls = [(f, m, runner.chunk_seed(s, k), chunk) for f in (FRAMES, 24) for m in ("direct", "longdiff")
                      for s in seeds for k, chunk in enumerate(chunks)]
    assert [(c["frames"], c["method"].name, c["seed"], c["prompts"]) for c in sampler.calls] == expected_calls
    assert all(c["kwargs"] == {"num_inference_steps": 3} for c in sampler.calls)
    rows = read_rows(tmp_path)
    sampled = [r for r in rows if r["method"] != runner.REFERENCE]
    # row order: frames, method, seed, prompt
    assert [(int(r["frames"]), r["method"], int(r["seed"]), r["prompt"]) for r in sampled] == [
        (f, m, s, p) for f in (FRAMES, 24) for m in ("direct", "longdiff") for s in seeds for p in texts]
    for r in sampled[::3]:
        p, s = texts.index(r["prompt"]), int(r["seed"])
        video = fake_video(r["prompt"], runner.chunk_seed(s, p // size), p % size, PRESETS[r["method"]],
                           int(r["frames"]))
        scores = metrics.all_metrics(video, r["prompt"])
        assert [float(r[m]) for m in metrics.METRICS] == [scores[m] for m in metrics.METRICS]


def test_batching_keeps_each_prompt_on_its_row(tmp_path):
    """With a sampler whose video depends on its own prompt only (the same noise whatever the batch), every
    batch size gives the rows of the old one-call-per-prompt path."""

    def per_prompt(pipe, prompts, num_frames, method, seed, **kwargs):
        return np.stack([fake_video(p, 7, 0, method, num_frames) for p in prompts])

    texts = runner.prompts(5, seed=4)
    contents = []
    for batch in (1, 2, 3, None):
        out = str(tmp_path / f"b{batch}")
        runner.run_shapes_bench(None, ["direct", "freenoise"], [FRAMES], texts, [0, 1], out, batch=batch,
                                sample_fn=per_prompt, reference=False, **QUIET)
        contents.append(keyed(read_rows(out)))
        assert json.loads(open(os.path.join(out, "config.json")).read())["batch"] == (batch or 5)
    old_path = {(m, FRAMES, p, s): tuple(str(v) for v in metrics.all_metrics(
        fake_video(p, 7, 0, PRESETS[m], FRAMES), p).values()) for m in ("direct", "freenoise") for p in texts
        for s in (0, 1)}
    assert all(c == old_path for c in contents)


# ---- resuming ---------------------------------------------------------------------------------------------


def test_resume_skips_done_rows_and_refills_chunks_with_their_noise(tmp_path):
    texts, methods, frames = runner.prompts(5, seed=2), ["direct", "freeloc"], [FRAMES, 24]
    run = dict(batch=2, **QUIET)
    whole = str(tmp_path / "whole")
    runner.run_shapes_bench(None, methods, frames, texts, [0, 1], whole, sample_fn=FakeSampler(), **run)
    reference = keyed(read_rows(whole))

    parts = str(tmp_path / "parts")
    with pytest.raises(RuntimeError, match="killed"):  # a device command ends after 7 calls
        runner.run_shapes_bench(None, methods, frames, texts, [0, 1], parts, sample_fn=FakeSampler(7), **run)
    csv_path = os.path.join(parts, "results.csv")
    lines = open(csv_path).read().splitlines(keepends=True)
    assert len(lines) == 1 + 12  # header + 7 chunks of 2, 2, 1, 2, 2, 1, 2 prompts
    dropped = lines.pop(4)  # one prompt of a two-prompt chunk lost (direct, 16 frames, seed 0, prompt 3) ...
    with open(csv_path, "w") as f:  # ... and a last line cut short by the kill
        f.writelines(lines + [lines[-1][:20]])
    sampler = FakeSampler()
    runner.run_shapes_bench(None, methods, frames, texts, [0, 1], parts, sample_fn=sampler, **run)
    assert keyed(read_rows(parts)) == reference  # the same rows as the uninterrupted run
    lost = next(csv.reader([dropped]))
    k = texts.index(lost[2]) // 2
    first = sampler.calls[0]  # the lost row's whole chunk, at the chunk's seed
    assert first["prompts"] == texts[2 * k:2 * k + 2] and first["seed"] == runner.chunk_seed(int(lost[3]), k)
    assert len(sampler.calls) == 1 + (2 * 2 * 2 * 3 - 7)  # then every chunk not sampled before
    again = FakeSampler()
    runner.run_shapes_bench(None, methods, frames, texts, [0, 1], parts, sample_fn=again, **run)
    assert again.calls == [] and len(read_rows(parts)) == len(reference)


def test_a_csv_from_before_the_motion_columns_is_upgraded_and_resumed(tmp_path):
    """Rows written without SR ... OV are kept (NaN in those columns), the file gets every column, and only the
    missing rows are sampled."""
    texts, out = runner.prompts(2, seed=3), str(tmp_path / "old")
    runner.run_shapes_bench(None, ["freeloc"], [FRAMES], texts, [0], out, sample_fn=FakeSampler(),
                            reference=False, **QUIET)
    old_fields = [f for f in runner.FIELDS if f not in ("SR", "DA", "PA", "MF", "OV")]
    rows = read_rows(out)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows[:1])
    sampler = FakeSampler()
    runner.run_shapes_bench(None, ["freeloc"], [FRAMES], texts, [0], out, sample_fn=sampler, reference=False,
                            **QUIET)
    upgraded = read_rows(out)
    assert list(upgraded[0]) == list(runner.FIELDS) and len(upgraded) == 2 and len(sampler.calls) == 1
    assert upgraded[0]["MF"] == "nan" and upgraded[0]["SC"] == rows[0]["SC"]
    assert upgraded[1] == rows[1] | {"seconds": upgraded[1]["seconds"]}


def test_time_budget_stops_between_batches_and_the_rerun_finishes(tmp_path):
    texts, messages = runner.prompts(2), []
    rows = runner.run_shapes_bench(None, ["direct", "longdiff"], [FRAMES, 24], texts, [0], str(tmp_path),
                                   sample_fn=FakeSampler(sleep=0.4), time_budget=1.0, log=messages.append,
                                   workers=1)
    # batches of >= 0.4 s: the third would end past 1 s (the ground truth of 16 frames may follow the second)
    assert 2 <= len(rows) <= 6 and "time budget" in messages[-1] and "run the same command again" in messages[-1]
    assert (tmp_path / "table.md").exists()
    rows = runner.run_shapes_bench(None, ["direct", "longdiff"], [FRAMES, 24], texts, [0], str(tmp_path),
                                   sample_fn=FakeSampler(), **QUIET)
    assert len(rows) == len(read_rows(tmp_path)) == 2 * 2 * 2 + 2 * 2


# ---- scoring in a pool ------------------------------------------------------------------------------------


def test_pool_scoring_equals_inline_scoring(tmp_path):
    texts = runner.prompts(4, seed=5)
    outs = {}
    for workers in (1, 2):
        out = str(tmp_path / f"w{workers}")
        runner.run_shapes_bench(None, ["direct", "freenoise"], [FRAMES, 48], texts, [0], out, batch=3,
                                sample_fn=FakeSampler(), workers=workers, log=lambda _: None)
        outs[workers] = [{k: v for k, v in r.items() if k != "seconds"} for r in read_rows(out)]
    assert outs[1] == outs[2] and len(outs[1]) == 3 * 2 * 4  # same rows, same order, same bits
    # noisy, off-prompt videos exercise every branch of the detector, still bit for bit
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8) for _ in range(3)]
    scorer = runner._Scorer(2, fps=8.0)
    try:
        pooled = scorer.submit(videos, texts[:3])()
    finally:
        scorer.close()
    assert pooled == [metrics.all_metrics(v, t) for v, t in zip(videos, texts)]


def test_default_workers_leaves_a_core_and_caps():
    cores = len(os.sched_getaffinity(0))
    assert runner.default_workers() == max(1, min(cores - 1, 8))


# ---- outputs, timings, command line -----------------------------------------------------------------------


def test_runner_writes_csv_table_plots_sheets_and_videos(tmp_path):
    texts, out = runner.prompts(3, seed=0), tmp_path / "bench"
    sampler = FakeSampler(sleep=0.05)
    rows = runner.run_shapes_bench(None, ["direct", "longdiff"], [FRAMES, 32], texts, [0, 1], str(out), batch=2,
                                   sample_fn=sampler, save_videos=True, **QUIET)
    assert len(rows) == 2 * 2 * 3 * 2 + 2 * 3 * 2  # plus ground-truth rows per frames x prompt x seed
    written = read_rows(out)
    assert len(written) == len(rows) and set(written[0]) == set(runner.FIELDS)
    summary = runner.summarise(rows)
    assert summary[("direct", 32)]["MS"][0] < summary[("longdiff", 32)]["MS"][0] - 20
    table = (out / "table.md").read_text()
    assert "| method | SC | BC | MS | TF | IQ | TA | DD |" in table and "### 32 frames" in table
    assert "| direct |" in table and "| ground-truth |" in table and "±" in table
    for metric in metrics.METRICS:
        assert (out / f"{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # seconds: the call's time shared by its prompts (a chunk of 2 then of 1)
    by_chunk = [float(r["seconds"]) for r in written if r["method"] == "longdiff" and r["frames"] == "32"][:3]
    assert by_chunk[0] == by_chunk[1] and 0.025 <= by_chunk[0] < by_chunk[2] and by_chunk[2] >= 0.05
    config = json.loads((out / "config.json").read_text())
    assert config["batch"] == 2 and config["prompts"] == texts and config["methods"] == ["direct", "longdiff"]
    assert set(config["first_call_seconds"]) == {f"{m}@{f}x{n}" for m in ("direct", "longdiff") for f in (FRAMES, 32)
                                                 for n in (2, 1)}
    # one .npy per sampled video; a contact sheet of every 8th frame per (method, frames), ground truth too
    saved = np.load(out / "videos" / "longdiff_32f_p2_s1.npy")
    np.testing.assert_array_equal(saved, fake_video(texts[2], runner.chunk_seed(1, 1), 0, PRESETS["longdiff"], 32))
    assert len(os.listdir(out / "videos")) == 2 * 2 * 3 * 2
    import imageio.v3 as iio

    sheet = iio.imread(out / "sheets" / "direct_32f.png")
    first = fake_video(texts[0], 0, 0, PRESETS["direct"], 32)
    np.testing.assert_array_equal(sheet, jaxlongvid.video.contact_sheet(first, every=8))
    assert sorted(os.listdir(out / "sheets")) == sorted(f"{m}_{f}f.png" for m in ("direct", "longdiff",
                                                                                   "ground-truth") for f in (16, 32))


def test_runner_command_line_options(tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(jaxlongvid, "load", lambda name: loaded.append(name) or "pipeline", raising=False)
    sampler = FakeSampler()
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    args = parser.parse_args(["--frames", "8,16", "--methods", "direct,longdiff:window=4:num_groups=4",
                              "--prompts", "3", "--seeds", "1", "--steps", "2", "--devices", "2", "--batch", "2",
                              "--precision", "default", "--workers", "1", "--save-videos", "--out", str(tmp_path)])
    assert runner.run_from_args(args, sample_fn=sampler) == 0
    assert loaded == ["tiny"]
    assert all(c["kwargs"] == {"num_inference_steps": 2, "devices": 2, "precision": "default"} for c in sampler.calls)
    assert [len(c["prompts"]) for c in sampler.calls] == [2, 1] * 4
    rows = read_rows(tmp_path)
    assert len(rows) == 2 * 2 * 3 + 2 * 3
    assert {r["method"] for r in rows} == {"direct", "longdiff[num_groups=4,window=4]", runner.REFERENCE}
    assert len(os.listdir(tmp_path / "videos")) == 2 * 2 * 3


def test_runner_rejects_bad_samples_and_settings(tmp_path):
    def wrong_dtype(pipe, prompts, num_frames, method, seed, **kwargs):
        return np.zeros((len(prompts), num_frames, 32, 32, 3), np.float32)

    def one_video(pipe, prompts, num_frames, method, seed, **kwargs):
        return np.zeros((num_frames, 32, 32, 3), np.uint8)

    args = (None, ["direct"], [8], ["a red circle", "a blue square"], [0], str(tmp_path))
    with pytest.raises(ValueError, match="uint8"):
        runner.run_shapes_bench(*args, sample_fn=wrong_dtype, **QUIET)
    with pytest.raises(ValueError, match=r"expected uint8 \[prompts, frames"):
        runner.run_shapes_bench(*args, sample_fn=one_video, **QUIET)
    with pytest.raises(ValueError, match="non-empty"):
        runner.run_shapes_bench(None, [], [8], ["a red circle"], [0], str(tmp_path), sample_fn=one_video)
    with pytest.raises(ValueError, match="unknown word"):
        runner.run_shapes_bench(None, ["direct"], [8], ["a red blob"], [0], str(tmp_path), sample_fn=one_video)
    with pytest.raises(ValueError, match="batch"):
        runner.run_shapes_bench(*args, batch=0, sample_fn=one_video)
    with pytest.raises(ValueError, match="workers"):
        runner.run_shapes_bench(*args, workers=0, sample_fn=one_video)
    with pytest.raises(ValueError, match="seeds"):
        runner.run_shapes_bench(None, ["direct"], [8], ["a red circle"], [runner.CHUNK_SEED_STRIDE],
                                str(tmp_path), sample_fn=one_video)


# ---- the tiny model ---------------------------------------------------------------------------------------


def test_tiny_model_batched_rows_are_the_batch_sample_and_resume_exactly(tmp_path):
    """Two prompts, one seed, 16 and 32 frames, 2 steps: each saved video is row p of ``sample(pipe, prompts,
    seed=0)``; a row removed from the CSV is sampled again (its whole chunk) to the same video and scores."""
    pipe = jaxlongvid.load("tiny")
    texts, method = runner.prompts(2, seed=1), "longdiff:num_groups=4"
    run = dict(steps=2, sample_fn=None, save_videos=True, reference=False, **QUIET)
    runner.run_shapes_bench(pipe, [method], [16, 32], texts, [0], str(tmp_path), **run)
    before = read_rows(tmp_path)
    label = "longdiff[num_groups=4]"
    assert [(r["method"], r["frames"]) for r in before] == [(label, "16")] * 2 + [(label, "32")] * 2
    direct = jaxlongvid.sample(pipe, texts, num_frames=32, method=runner.parse_method(method), seed=0,
                               num_inference_steps=2, progress=False)
    videos = tmp_path / "videos"
    for p in range(2):
        np.testing.assert_array_equal(np.load(videos / f"longdiff_num_groups=4_32f_p{p}_s0.npy"), direct[p])
    first = np.load(videos / "longdiff_num_groups=4_32f_p1_s0.npy")
    lines = open(tmp_path / "results.csv").read().splitlines(keepends=True)
    with open(tmp_path / "results.csv", "w") as f:
        f.writelines(lines[:-1])  # lose prompt 1 at 32 frames
    os.remove(videos / "longdiff_num_groups=4_32f_p1_s0.npy")
    runner.run_shapes_bench(pipe, [method], [16, 32], texts, [0], str(tmp_path), **run)
    after = read_rows(tmp_path)
    assert keyed(after) == keyed(before)
    np.testing.assert_array_equal(np.load(videos / "longdiff_num_groups=4_32f_p1_s0.npy"), first)


def test_resume_refuses_changed_settings(tmp_path):
    """A finished directory rerun with other sampler settings or a changed method under the same name is
    refused (it would sample nothing and relabel the rows); the same settings resume, a new method adds rows."""
    texts = runner.prompts(2)
    run = dict(reference=False, workers=1)
    runner.run_shapes_bench(None, ["direct"], [FRAMES], texts, [0], str(tmp_path), sample_fn=FakeSampler(), **run)
    with pytest.raises(ValueError, match=r"other settings \(sample_kwargs: .*'num_inference_steps': '4'"):
        runner.run_shapes_bench(None, ["direct"], [FRAMES], texts, [0], str(tmp_path), steps=4,
                                sample_fn=FakeSampler(), **run)
    with pytest.raises(ValueError, match=r"method direct: Method\(name='direct', positions=Identity.* -> .*GroupShift"):
        runner.run_shapes_bench(None, [PRESETS["longdiff"].replace(name="direct")], [FRAMES], texts, [0],
                                str(tmp_path), sample_fn=FakeSampler(), **run)
    calls = FakeSampler()
    rows = runner.run_shapes_bench(None, ["direct", "freeloc"], [FRAMES], texts, [0], str(tmp_path), sample_fn=calls,
                                   **run)
    assert len(rows) == 4 and {r["method"] for r in rows} == {"direct", "freeloc"}
    assert json.loads((tmp_path / "config.json").read_text())["run_key"]["sample_kwargs"] == {}


def test_bench_does_not_preallocate_the_gpu(monkeypatch):
    from jaxlongvid import cli

    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    monkeypatch.setattr(runner, "run_from_args", lambda args: 0)
    assert cli.main(["bench", "shapes", "--out", "x"]) == 0
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"


def test_motions_option_draws_prompts_of_those_laws_only(tmp_path):
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    sampler = FakeSampler()
    args = parser.parse_args(["--frames", "8", "--methods", "direct", "--prompts", "4", "--seeds", "1", "--workers",
                              "1", "--motions", "bouncing, circling", "--no-reference", "--out", str(tmp_path)])
    assert runner.run_from_args(args, sample_fn=sampler) == 0
    texts = [p for c in sampler.calls for p in c["prompts"]]
    assert texts == runner.prompts(4, 0, ("bouncing", "circling")) and len(set(texts)) == 4
    assert {runner.law_group(p) for p in texts} == {"in-frame"}
    assert all(("bouncing" in p) != ("circling" in p) for p in texts)
    args.motions = "bouncing,flying"
    with pytest.raises(ValueError, match="unknown motion 'flying'"):
        runner.run_from_args(args, sample_fn=sampler)


def test_table_splits_linear_and_in_frame_laws():
    """Linear laws wrap round the frame in long ground truth, bouncing and circling stay in it: the table gives
    each group its own rows (means over that group's videos only) after the table over every video."""
    assert runner.law_group("a red circle moving left on a black background") == "linear"
    assert runner.law_group("a blue square bouncing") == "in-frame"
    assert runner.law_group("a green triangle circling on a striped background") == "in-frame"
    prompts = ["a red circle moving left", "a red circle moving up", "a blue square bouncing"]
    rows = [dict({m: 0.0 for m in metrics.METRICS}, method="m", frames=128, prompt=p, seed=0,
                 SR=sr) for p, sr in zip(prompts, (20.0, 10.0, 90.0))]
    table = runner.markdown_table(rows)
    sr = metrics.METRICS.index("SR")
    cell = lambda heading: table.split(heading)[1].split("| m | ")[1].split(" | ")[sr].split(" ±")[0]
    assert cell("### 128 frames (") == "40.00"
    assert cell("### 128 frames, in-frame laws (mean ± std over 1 videos") == "90.00"
    assert cell("### 128 frames, linear laws (mean ± std over 2 videos") == "15.00"
    one_group = runner.markdown_table(rows[:2])
    assert "laws" not in one_group.split("Columns:")[0]

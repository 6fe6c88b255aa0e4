"""Nothing lost: atomic files, pipeline swaps that only replace pipelines, and real SIGKILLs mid-write."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import jaxlongvid.pipeline as pipeline_lib
from jaxlongvid import files, video
from test_sampling import make_pipeline

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env


def _kill_when(proc, path_appears: str, delay: float, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not os.path.exists(path_appears):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < end, "the writer never started"
        time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_atomic_file_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_file(str(target)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("writer died")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]
    with files.atomic_file(str(target)) as tmp:
        open(tmp, "w").write("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["a.txt"]


@pytest.mark.parametrize("name,error", [("missing/v.gif", "folder .* does not exist"), ("dir", "is a directory"),
                                        ("dangling.gif", "symbolic link to a missing file")])
def test_bad_output_paths(tmp_path, name, error):
    (tmp_path / "dir").mkdir()
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling.gif")
    with pytest.raises(OSError, match=error):
        files.check_output_file(str(tmp_path / name))


@pytest.mark.parametrize("ext", [".gif", ".mp4"])
def test_killed_video_write_leaves_the_old_video(tmp_path, ext):
    out = tmp_path / f"v{ext}"
    old = np.zeros((2, 8, 8, 3), np.uint8)
    video.save_video(old, out)
    before = out.read_bytes()
    script = (f"import numpy as np, sys; from jaxlongvid import video\n"
              f"v = np.random.default_rng(0).integers(0, 255, (1500, 64, 64, 3), dtype=np.uint8)\n"
              f"open({str(tmp_path / 'started')!r}, 'w').close()\n"
              f"video.save_video(v, {str(out)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=_env(), stderr=subprocess.PIPE)
    _kill_when(proc, str(tmp_path / "started"), 0.5)
    assert proc.returncode == -signal.SIGKILL, "the write finished before the kill: make the video longer"
    assert out.read_bytes() == before  # the previous video, whole
    leftovers = sorted(set(os.listdir(tmp_path)) - {out.name, "started"})
    assert all(name.startswith(f".{out.name}.tmp-") for name in leftovers), leftovers


def test_killed_save_leaves_the_previous_pipeline(tmp_path):
    """A process SIGKILLed while saving over a pipeline again and again: ``load`` gets a complete pipeline
    (the previous or the new one), never a half-written one; the next save cleans the leftovers."""
    out = tmp_path / "model"
    first = make_pipeline(seed=0)
    pipeline_lib.save(first, out)
    script = (f"import jaxlongvid.pipeline as p; from test_sampling import make_pipeline\n"
              f"pipe = make_pipeline(seed=5)\n"
              f"open({str(tmp_path / 'started')!r}, 'w').close()\n"
              f"while True: p.save(pipe, {str(out)!r}, overwrite=True)\n")
    for delay in (0.3, 1.1):
        proc = subprocess.Popen([sys.executable, "-c", script], env=_env(), stderr=subprocess.PIPE)
        _kill_when(proc, str(tmp_path / "started"), delay)
        os.remove(tmp_path / "started")
        loaded = pipeline_lib.load(str(out))  # recovers an interrupted swap if needed
        want = first if np.array_equal(jax.tree_util.tree_leaves(loaded.params)[0],
                                       jax.tree_util.tree_leaves(first.params)[0]) else make_pipeline(seed=5)
        jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.params, want.params)
    pipeline_lib.save(first, out, overwrite=True)
    assert os.listdir(tmp_path) == ["model"]  # temporaries of the killed writers are gone


def test_crash_between_the_two_renames_is_recovered(tmp_path):
    out = tmp_path / "model"
    pipe = make_pipeline(seed=0)
    pipeline_lib.save(pipe, out)
    old = files.temp_sibling(str(out), "old")
    os.replace(out, old)  # the state a kill between the renames leaves: out missing, its previous version aside
    os.makedirs(files.temp_sibling(str(out)))  # and a staging directory
    loaded = pipeline_lib.load(str(out))
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.params, pipe.params)
    assert os.path.isdir(out)
    pipeline_lib.save(pipe, out, overwrite=True)
    assert os.listdir(tmp_path) == ["model"]


def test_overwrite_refuses_anything_but_a_pipeline(tmp_path, monkeypatch):
    """``--out . --overwrite`` in a folder of user files refuses and deletes nothing."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "sub").mkdir()
    (tmp_path / "afile").write_text("x")
    monkeypatch.chdir(tmp_path)
    pipe = make_pipeline(seed=0)
    for target in (".", str(tmp_path / "sub"), str(tmp_path / "afile")):
        with pytest.raises(FileExistsError, match="only replaces pipeline directories, so nothing was deleted"):
            pipeline_lib.save(pipe, target, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["afile", "notes.txt", "sub"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_concurrent_writers_are_refused(tmp_path):
    out = str(tmp_path / "model")
    with files.directory_lock(out):
        with pytest.raises(files.BusyError, match="being written by another process"):
            pipeline_lib.save(make_pipeline(seed=0), out)
    assert os.listdir(tmp_path) == []


def test_load_refuses_non_finite_and_misshaped_weights(tmp_path):
    pipe = make_pipeline(seed=0)
    params = jax.tree_util.tree_map(np.array, pipe.params)
    params["unet"]["conv_in"]["kernel"][0, 0, 0, 0] = np.nan
    pipeline_lib.save(pipeline_lib.Pipeline(pipe.config, params, pipe.tokenizer), tmp_path / "nan")
    with pytest.raises(ValueError, match=r"1 non-finite: unet/conv_in/kernel \(1 of"):
        pipeline_lib.load(str(tmp_path / "nan"))
    params = jax.tree_util.tree_map(np.array, pipe.params)
    del params["unet"]["conv_out"]
    params["unet"]["time"]["kernel"] = params["unet"]["time"]["kernel"][:, :3]
    pipeline_lib.save(pipeline_lib.Pipeline(pipe.config, params, pipe.tokenizer), tmp_path / "bad")
    with pytest.raises(ValueError, match=r"2 missing: unet/conv_out/bias, unet/conv_out/kernel; 1 mis-shaped: "
                                         r"unet/time/kernel \(16, 3\) \(model: \(16, 16\)\)"):
        pipeline_lib.load(str(tmp_path / "bad"))


def test_broken_pipeline_json_names_the_file(tmp_path):
    pipeline_lib.save(make_pipeline(seed=0), tmp_path / "m")
    (tmp_path / "m" / "pipeline.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"m/pipeline.json: not a readable jaxlongvid pipeline config"):
        pipeline_lib.load(str(tmp_path / "m"))


def test_convert_refuses_non_finite_weights_and_keeps_the_old_pipeline(tmp_path):
    from convert import pipelines

    out = tmp_path / "model"
    pipe = make_pipeline(seed=0)
    pipeline_lib.save(pipe, out)
    params = jax.tree_util.tree_map(np.array, pipe.params)
    params["text"][next(iter(params["text"]))] = jax.tree_util.tree_map(lambda a: a * np.inf,
                                                                         params["text"][next(iter(params["text"]))])
    bad = pipeline_lib.Pipeline(pipe.config, params, pipe.tokenizer)
    with pytest.raises(pipelines.CheckpointError, match=r"non-finite weights .* in \d+ leaves: text/"):
        pipelines._convert_and_save(lambda: bad, out, overwrite=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, pipeline_lib.load(str(out)).params, pipe.params)


def test_truncated_weights_fail_in_one_line_naming_the_pipeline(tmp_path):
    """A data file of the checkpoint cut to 0 bytes: orbax gives up while other reads are in flight, whose
    'Event loop is closed' reports used to follow the error on stderr (2 to 30 tracebacks)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(pipeline_lib.TINY_DIR, model)
    data = model / "params" / "ocdbt.process_0" / "d"
    biggest = max(data.iterdir(), key=lambda p: p.stat().st_size)
    biggest.write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "jaxlongvid.cli", "info", "--model", str(model)], env=_env(),
                          capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 1 and len(err.splitlines()) == 1, err
    assert f"{model}/params: the weights cannot be read, the checkpoint is damaged or incomplete" in err


def test_expected_shapes_are_traced_once_per_config_and_code(tmp_path, monkeypatch):
    """load's validation reads the model's parameter shapes from a file cache keyed by the config and the code
    (tracing the model's init took seconds of every load)."""
    monkeypatch.setenv("JAXLONGVID_CACHE", str(tmp_path / "cache"))
    config = make_pipeline(seed=0).config
    traced = pipeline_lib.flat_shapes(pipeline_lib.param_shapes(config))
    assert pipeline_lib.expected_shapes(config) == traced and "unet/conv_in/kernel" in traced
    (cached,) = (tmp_path / "cache" / "param_shapes").iterdir()

    def fail(config):
        raise AssertionError("traced again")

    monkeypatch.setattr(pipeline_lib, "param_shapes", fail)
    assert pipeline_lib.expected_shapes(config) == traced  # from the file
    cached.write_text("{damaged")
    with pytest.raises(AssertionError, match="traced again"):  # a damaged file is not trusted
        pipeline_lib.expected_shapes(config)
    monkeypatch.setattr(pipeline_lib, "code_digest", lambda: "other code")
    with pytest.raises(AssertionError, match="traced again"):  # other code: another key
        pipeline_lib.expected_shapes(config)


@pytest.mark.parametrize("entries,problem", [
    ({"num_frames": "x"}, "PipelineConfig.num_frames must be an integer >= 1, got 'x'"),
    ({"unet": None}, "'NoneType' object has no attribute"),
    ({"unet": {"class": "Nope", "config": {}}}, "unknown model config class 'Nope'"),
])
def test_broken_pipeline_json_is_one_cli_line_naming_the_file(tmp_path, capsys, entries, problem):
    import json

    from jaxlongvid import cli

    pipeline_lib.save(make_pipeline(seed=0), tmp_path / "m")
    path = tmp_path / "m" / "pipeline.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **entries}))
    code = cli.main(["info", "--model", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert f"{path}: not a readable jaxlongvid pipeline config ({problem}" in err

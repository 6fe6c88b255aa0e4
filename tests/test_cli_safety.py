"""The command line fails fast and clearly: checks before compiling, the memory estimate, --help without JAX."""

import os
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jaxlongvid.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    return proc, time.perf_counter() - start


@pytest.mark.parametrize("args,message", [
    (["--frames", "100000", "--out", "v.gif"], r"--frames 100000: estimated \d+\.\d GB per device, .* about \d+ frames"),
    (["--frames", "4096", "--out", "v.gif"], r"--frames 4096: estimated \d+\.\d GB per device, .* --force"),
    (["--frames", "16", "--out", "missing/v.gif"], r"missing/v.gif: the folder .* does not exist"),
    (["--frames", "16", "--out", "adir.gif"], r"adir.gif is a directory"),
])
def test_sample_fails_fast(tmp_path, args, message):
    import re

    (tmp_path / "adir.gif").mkdir()
    proc, seconds = _cli("sample", "--prompt", "a red circle moving right", *args, cwd=tmp_path)
    err = proc.stderr.strip()
    assert proc.returncode == 1 and re.search(message, err), err
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    assert seconds < 60, seconds  # before compiling: 4096 frames used to compile for minutes first
    assert sorted(os.listdir(tmp_path)) == ["adir.gif"]  # nothing written


def test_version_and_help_do_not_start_jax(tmp_path):
    proc, _ = _cli("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().startswith("jaxlongvid 0.")
    code = "import sys, jaxlongvid.cli as c; c.build_parser(); print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
    for command in ("sample", "info", "convert", "bench", "probe"):
        proc, _ = _cli(command, "--help", cwd=tmp_path)
        assert proc.returncode == 0
        description = proc.stdout.split("\n\n")[1]
        assert not description.lstrip().startswith(("options", "positional")), (command, description)


def test_fps_zero_is_refused_by_the_parser(tmp_path):
    proc, _ = _cli("sample", "--prompt", "x", "--fps", "0", "--out", "v.gif", cwd=tmp_path)
    assert proc.returncode == 2 and "--fps: expected a finite number > 0, got 0" in proc.stderr

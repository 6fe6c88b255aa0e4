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
    assert seconds < 15, seconds
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


def test_convert_to_a_dangling_symlink_is_refused(tmp_path):
    (tmp_path / "pipe").symlink_to(tmp_path / "nowhere" / "pipe")
    unet = os.path.join(HERE, "fixtures", "tiny", "lavie", "lavie_tiny.pt")
    for extra in ([], ["--overwrite"]):
        proc, _ = _cli("convert", "lavie", "--unet", unet, "--out", "pipe", *extra, cwd=tmp_path)
        err = proc.stderr.strip()
        assert proc.returncode == 1 and len(err.splitlines()) == 1, err
        assert f"{tmp_path}/pipe is a symbolic link to a missing path ({tmp_path}/nowhere/pipe)" in err, err
    assert os.listdir(tmp_path) == ["pipe"] and not (tmp_path / "nowhere").exists()


def test_convert_without_torch_says_what_to_install(tmp_path):
    """torch missing (simulated: ``sys.modules["torch"] = None`` makes every import of it fail)."""
    unet = os.path.join(HERE, "fixtures", "tiny", "lavie", "lavie_tiny.pt")
    code = ("import sys; sys.modules['torch'] = None; from jaxlongvid import cli; "
            f"sys.exit(cli.main(['convert', 'lavie', '--unet', {unet!r}, '--out', 'pipe']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
    err = proc.stderr.strip()
    assert proc.returncode == 1 and len(err.splitlines()) == 1, err
    assert "jaxlongvid convert: error: jaxlongvid convert needs torch" in err
    assert "pip install 'jaxlongvid[convert]'" in err and os.listdir(tmp_path) == []


def test_tiny_vocabulary_is_listed_and_unknown_or_cut_words_warn(capsys, monkeypatch):
    import warnings

    from jaxlongvid import cli
    from jaxlongvid.models.tokenizers import load_tokenizer
    from jaxlongvid.pipeline import TINY_DIR

    assert cli.main(["info", "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "vocabulary (30 words; other words are unknown to the model, prompts are cut after 14 words): a and " \
           "background black blue bouncing" in out
    tokenizer = load_tokenizer(os.path.join(TINY_DIR, "tokenizer"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer.encode(["a red circle moving right on a black background", ""])  # known words: silent
    with pytest.warns(UserWarning, match=r"'a panda playing guitar': the model does not know guitar, panda, "
                                         r"playing \(read as <unk>\); its vocabulary: a and background"):
        tokenizer.encode("a panda playing guitar")
    with pytest.warns(UserWarning, match=r"16 words, the model reads the first 14 \(cut: red blue\)"):
        tokenizer.encode("a " * 14 + "red blue")
    monkeypatch.setattr(cli, "run_info", lambda args: int(tokenizer.encode("a red guitar") is None))
    assert cli.main(["info"]) == 0  # the CLI prints a warning as one line
    assert capsys.readouterr().err == ("jaxlongvid info: warning: prompt 'a red guitar': the model does not know "
                                       f"guitar (read as <unk>); its vocabulary: {' '.join(tokenizer.words)}\n")

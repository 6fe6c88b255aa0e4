"""Every command in the README is run by a test or by CI.

The README's ```bash blocks are split into commands (one per line, ``&&`` chains split); the list must equal
:data:`COMMANDS`, which says for each command where it runs, so a new or edited README command fails here until
it is given a test. Three ways a command is covered:

* ``RUN``: run verbatim here, as a user would type it, in a temporary directory with the test harness's
  ``XLA_FLAGS`` (8 host devices) removed: the first ``jaxlongvid sample`` (128 frames, longdiff: ~70-150 s on 2
  cores) and ``jaxlongvid probe``.
* ``CI``: executed by ``.ci/run`` before this suite; checked against that file here. ``pip install -e .`` is
  covered by CI's ``pip install -e ".[test,convert]"``, which installs the same package plus the extras.
* ``PARSED``: the command needs what CI does not have (the released checkpoints, a GPU, or hours of CPU), so
  here it is parsed by the real ``jaxlongvid`` parser and dispatched to a recorder in place of the slow call,
  checking the arguments it would get; the same code path runs on tiny inputs in the test named in
  :data:`COMMANDS`.

The Python snippet is run in-process with ``num_frames=128`` reduced to 32 (its longdiff at 128 frames takes
~430 s and ~13 GB on a 2-core CPU, see the README); everything else in it is verbatim.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from jaxlongvid import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"
RUN, CI, PARSED = "run here", "run by .ci/run", "parsed here"
# subprocess.run warns that JAX is multithreaded when it forks; the child execs at once, so nothing can deadlock
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")

DEMO = ('jaxlongvid sample --prompt "a red circle moving right on a black background" --frames 128 '
        '--method auto --out demo.gif')
PROBE = 'jaxlongvid probe --model tiny --prompt "a red circle moving left" --long-frames 64 --out probe.json'
CONVERT_LAVIE = "jaxlongvid convert lavie --unet lavie_base.pt --sd stable-diffusion-v1-4/ --out lavie-jax"
CONVERT_VC = "jaxlongvid convert videocrafter --ckpt model.ckpt --version 2 --out vc2-jax"
CONVERT_MS = "jaxlongvid convert modelscope --diffusers text-to-video-ms-1.7b/ --out modelscope-jax"
PANDA = ('jaxlongvid sample --model lavie-jax --prompt "a panda playing guitar" --frames 128 --method longdiff '
         '--steps 50 --out panda.mp4')
CONVERT_WAN = "jaxlongvid convert wan --diffusers Wan2.1-T2V-1.3B-Diffusers/ --out wan-jax"
CONVERT_WAN_ORIGINAL = "jaxlongvid convert wan --original Wan2.1-T2V-1.3B/ --out wan-jax"
WAN_81 = ('jaxlongvid sample --model wan-jax --prompt "a corgi running on the beach" --frames 81 --method direct '
          '--out corgi.mp4')
WAN_LONG = ('jaxlongvid sample --model wan-jax --prompt "a corgi running on the beach" --frames 333 --method direct '
            '--devices 8 --out corgi_long.mp4')
TEST = "python -m pytest -q -n 2 --dist loadfile tests"  # two workers, a test file's tests on one
BENCH = ("jaxlongvid bench shapes --frames 64,128 --methods direct,freenoise,freelong,longdiff,freeloc "
         "--prompts 8 --seeds 2 --out bench/")

# README command -> (how it is covered, where)
COMMANDS = {
    "pip install -e .": (CI, 'pip install -e ".[test,convert]"'),
    DEMO: (RUN, "test_first_command_verbatim"),
    'pip install "torch==2.13.0"': (CI, 'pip install "torch==2.13.0"'),
    'pip install -e ".[test,convert]"': (CI, 'pip install -e ".[test,convert]"'),
    TEST: (CI, TEST),
    CONVERT_LAVIE: (PARSED, "test_convert_pipelines.py::test_lavie_with_sd_components_samples"),
    CONVERT_VC: (PARSED, "test_convert_pipelines.py::test_videocrafter_unet_only, "
                         "test_videocrafter_cli_vocab_all_components"),
    CONVERT_MS: (PARSED, "test_convert_pipelines.py::test_modelscope_diffusers_folder"),
    PANDA: (PARSED, "test_cli.py::test_sample_end_to_end (a tiny LaVie-style UNet3D, longdiff)"),
    CONVERT_WAN: (PARSED, "test_wan_pipeline.py::test_converted_pipeline_config_and_round_trip"),
    CONVERT_WAN_ORIGINAL: (PARSED, "test_wan_pipeline.py::test_original_layout_through_the_cli"),
    WAN_81: (PARSED, "test_wan_pipeline.py::test_sample_python_and_cli_deterministic (a tiny Wan, 9 frames)"),
    WAN_LONG: (PARSED, "test_wan_pipeline.py::test_sharded_equals_unsharded (a tiny Wan on 8 host devices)"),
    PROBE: (RUN, "test_probe_command_verbatim"),
    BENCH: (PARSED, "test_bench_runner.py (the runner on scaled-down settings)"),
}


# ---- reading the README ----------------------------------------------------------------------------------------
def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)


def readme_commands() -> list[str]:
    """Every command of the README's bash blocks, in order (continuation lines joined, ``&&`` chains split)."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands += [" ".join(part.split()) for part in line.split(" && ")]
    return commands


def ci_commands() -> list[str]:
    """The commands of ``.ci/run``, normalised to how the README writes them (``pip`` for ``python3 -m pip``,
    without ``--quiet``)."""
    commands = []
    for line in CI_SCRIPT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.startswith(("set ", "cd ")):
            continue
        line = re.sub(r"^python3? -m pip ", "pip ", line).replace(" --quiet", "")
        commands.append(line)
    return commands


def test_every_readme_command_is_covered():
    assert readme_commands() == list(COMMANDS), (
        "the README's commands changed: give each new command a test here (COMMANDS says where each one runs)")
    assert len(code_blocks("python")) == 1, "a new Python snippet in the README: run it in this file"


def test_ci_runs_the_install_and_test_commands():
    ci = ci_commands()
    for command, (how, ci_command) in COMMANDS.items():
        if how == CI:
            assert ci_command in ci, f"{command!r}: .ci/run has no {ci_command!r} (it has {ci})"
    assert ci[-1] == TEST  # the README's test command, verbatim and last


# ---- run verbatim ----------------------------------------------------------------------------------------------
def run_verbatim(command: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """``command`` in a shell, in ``cwd``, without the test harness's XLA_FLAGS; the ``jaxlongvid`` script of
    this Python first on PATH."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    result = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command}\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-4000:]}"
    return result


def test_first_command_verbatim(tmp_path):
    result = run_verbatim(DEMO, tmp_path, timeout=1200)
    frames = iio.imread(tmp_path / "demo.gif", index=None)
    assert frames.shape == (128, 32, 32, 3)  # 128 frames of the tiny model's 32x32
    assert "wrote demo.gif: 128 frames, 32x32" in result.stdout
    assert "warning" not in result.stderr  # every word of the prompt is in the tiny model's vocabulary
    assert frames.std() > 5 and np.abs(np.diff(frames.astype(float), axis=0)).mean() > 0  # a picture that moves


def test_probe_command_verbatim(tmp_path):
    import json

    result = run_verbatim(PROBE, tmp_path, timeout=900)
    report = json.loads((tmp_path / "probe.json").read_text())
    assert report["prompts"] == ["a red circle moving left"] and report["model"] == "tiny"
    layers = report["scores"]["context"]
    assert layers and set(report["scores"]["position"]) == set(layers) == set(report["routes"])
    assert all(np.isfinite(v) for v in list(layers.values()) + list(report["scores"]["position"].values()))
    assert all(name in result.stdout for name in report["routes"])  # one printed line per layer


def test_python_snippet(tmp_path, monkeypatch, optimized_compiles):  # 25 steps at 32 frames run long
    """The README's Python block, with num_frames 128 -> 32 (see the module notes); its comment's claims hold."""
    (snippet,) = code_blocks("python")
    assert snippet.count("num_frames=128") == 1
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet.replace("num_frames=128", "num_frames=32"), str(README), "exec"), namespace)
    video = namespace["video"]
    assert isinstance(video, np.ndarray) and video.dtype == np.uint8 and video.shape == (32, 32, 32, 3)
    written = iio.imread(tmp_path / "out.mp4", index=None)
    assert written.shape == video.shape  # the .mp4 holds every frame (H.264 is lossy: values are not compared)


# ---- parsed and dispatched (need checkpoints, a GPU or hours) -------------------------------------------------
def argv(command: str) -> list[str]:
    words = shlex.split(command)
    assert words[0] == "jaxlongvid"
    return words[1:]


@pytest.mark.parametrize("command,function,kwargs", [
    (CONVERT_LAVIE, "convert_lavie", dict(unet="lavie_base.pt", sd="stable-diffusion-v1-4/", config=None)),
    (CONVERT_VC, "convert_videocrafter", dict(ckpt="model.ckpt", version=2, config=None, vocab=None)),
    (CONVERT_MS, "convert_modelscope", dict(diffusers="text-to-video-ms-1.7b/")),
    (CONVERT_WAN, "convert_wan", dict(diffusers="Wan2.1-T2V-1.3B-Diffusers/", original=None)),
    (CONVERT_WAN_ORIGINAL, "convert_wan", dict(diffusers=None, original="Wan2.1-T2V-1.3B/")),
])
def test_convert_commands_reach_their_converter(command, function, kwargs, fake_converters, capsys):
    assert COMMANDS[command][0] == PARSED
    assert cli.main(argv(command)) == 0
    out = shlex.split(command)[-1]
    assert fake_converters == [(function, dict(kwargs, out=out, overwrite=False))]
    assert f"wrote {out}" in capsys.readouterr().out


def test_gpu_sample_command_reaches_sample(monkeypatch, tmp_path):
    """The 128-frame LaVie command: loads ``lavie-jax`` and calls ``sample`` with the README's settings."""
    import jaxlongvid.pipeline as pipeline_lib
    from jaxlongvid import sampling

    loaded, calls = [], []
    tiny_config = pipeline_lib.load_config("tiny")  # stands in for LaVie's config: the memory check is recorded
    monkeypatch.setattr(pipeline_lib, "load_config", lambda name: loaded.append(name) or tiny_config)
    monkeypatch.setattr(cli, "check_memory", lambda config, method, args: calls.append(("memory", method.name)))
    monkeypatch.setattr(pipeline_lib, "load", lambda name: loaded.append(name) or "PIPE")
    monkeypatch.setattr(sampling, "sample", lambda pipe, prompt, **kw: calls.append((pipe, prompt, kw))
                        or np.zeros((128, 8, 8, 3), np.uint8))
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv(PANDA)) == 0
    assert loaded == ["lavie-jax", "lavie-jax"]
    memory, (pipe, prompt, kw) = calls
    assert memory == ("memory", "longdiff") and (pipe, prompt) == ("PIPE", "a panda playing guitar")
    assert (kw["num_frames"], kw["method"].name, kw["num_inference_steps"]) == (128, "longdiff", 50)
    assert (tmp_path / "panda.mp4").is_file()


def test_bench_command_parses():
    args = cli.build_parser().parse_args(argv(BENCH))
    assert (args.command, args.suite, args.frames, args.prompts, args.seeds, args.out) == (
        "bench", "shapes", "64,128", 8, 2, "bench/")
    assert args.methods.split(",") == ["direct", "freenoise", "freelong", "longdiff", "freeloc"]
    assert args.func is cli.run_bench_shapes


@pytest.mark.parametrize("command,frames,devices", [(WAN_81, 81, None), (WAN_LONG, 333, 8)])
def test_wan_sample_commands_parse(command, frames, devices):
    """The Wan commands need the released weights: parsed by the real parser (the same path runs on a tiny
    converted Wan in tests/test_wan_pipeline.py)."""
    args = cli.build_parser().parse_args(argv(command))
    assert (args.model, args.frames, args.method, args.devices) == ("wan-jax", frames, "direct", devices)
    assert args.func is cli.run_sample and (frames - 1) % 4 == 0

"""The ``jaxlongvid`` command: argument parsing, the convert dispatch, and an end-to-end ``sample`` run with a
tiny random LaVie-style UNet3D pipeline saved in a temporary directory."""


import imageio.v3 as iio
import numpy as np
import pytest

import jaxlongvid.pipeline as pipeline_lib
from jaxlongvid import cli
from test_sampling import PROMPTS, tiny_unet_pipeline


def test_sample_arguments():
    args = cli.build_parser().parse_args(
        ["sample", "--prompt", "a red circle", "--frames", "64", "--method", "longdiff", "--out", "x.mp4",
         "--steps", "25", "--guidance", "7.5", "--seed", "3", "--devices", "8", "--height", "320", "--width", "512"])
    assert (args.command, args.prompt, args.frames, args.method, args.out) == ("sample", "a red circle", 64,
                                                                               "longdiff", "x.mp4")
    assert (args.steps, args.guidance, args.seed, args.devices, args.height, args.width) == (25, 7.5, 3, 8, 320, 512)
    assert args.model == "tiny" and args.func is cli.run_sample
    defaults = cli.build_parser().parse_args(["sample", "--prompt", "p", "--out", "x.gif"])
    assert (defaults.frames, defaults.steps, defaults.guidance, defaults.seed, defaults.devices) == (
        None, None, None, 0, None)
    assert defaults.precision is None  # the sampler decides (highest for float32 models)


def test_precision_flag_reaches_sample(model_dir, end_to_end, tmp_path, monkeypatch):
    """--precision takes exactly the sampler's values and is passed to ``sample``; left out, ``sample`` gets None."""
    from jaxlongvid import sampling

    for precision in sampling.PRECISIONS:  # others exit 2 (test_bad_syntax_exits_2)
        args = cli.build_parser().parse_args(["sample", "--prompt", "p", "--out", "x.gif", "--precision", precision])
        assert args.precision == precision
    seen = []
    real = sampling.sample
    monkeypatch.setattr(sampling, "sample", lambda *a, **kw: seen.append(kw["precision"]) or real(*a, **kw))
    small = ["sample", "--model", model_dir, "--prompt", PROMPTS[0], "--frames", "8", "--steps", "1",
             "--height", "8", "--width", "8", "--no-progress"]
    assert cli.main(small + ["--precision", "high", "--out", str(tmp_path / "x.gif")]) == 0
    # left out: the run of test_sample_end_to_end, so the session compiles its program once for both tests
    assert cli.main(end_to_end + ["--out", str(tmp_path / "y.gif")]) == 0
    assert seen == ["high", None]


@pytest.mark.parametrize("argv", [
    ["sample", "--out", "x.gif"],  # no prompt
    ["sample", "--prompt", "p"],  # no output
    ["sample", "--prompt", "p", "--out", "x.gif", "--frames", "0"],
    ["sample", "--prompt", "p", "--out", "x.gif", "--steps", "many"],
    ["sample", "--prompt", "p", "--out", "x.gif", "--precision", "fast"],
    ["convert", "videocrafter", "--ckpt", "m.ckpt", "--version", "3", "--out", "d"],
    ["convert", "lavie", "--out", "d"],  # no --unet
    ["convert", "wan", "--out", "d"],
    [],
])
def test_bad_syntax_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("argv,function,kwargs", [
    (["convert", "lavie", "--unet", "lavie_base.pt", "--sd", "sd14", "--out", "d"], "convert_lavie",
     dict(unet="lavie_base.pt", sd="sd14", config=None, out="d", overwrite=False)),
    (["convert", "videocrafter", "--ckpt", "m.ckpt", "--version", "2", "--config", "c.yaml", "--out", "d",
      "--overwrite"], "convert_videocrafter",
     dict(ckpt="m.ckpt", version=2, config="c.yaml", vocab=None, out="d", overwrite=True)),
    (["convert", "videocrafter", "--ckpt", "m.ckpt", "--version", "1", "--vocab", "bpe.txt.gz", "--out", "d"],
     "convert_videocrafter", dict(ckpt="m.ckpt", version=1, config=None, vocab="bpe.txt.gz", out="d",
                                  overwrite=False)),
    (["convert", "modelscope", "--diffusers", "ms", "--out", "d"], "convert_modelscope",
     dict(diffusers="ms", out="d", overwrite=False)),
    (["convert", "wan", "--original", "release", "--out", "d"], "convert_wan",
     dict(diffusers=None, original="release", out="d", overwrite=False)),
])
def test_convert_dispatch(fake_converters, capsys, argv, function, kwargs):
    assert cli.main(argv) == 0
    assert fake_converters == [(function, kwargs)]
    assert "wrote d" in capsys.readouterr().out


def test_cpu_device_count_flag(monkeypatch):
    import os

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    cli._host_devices_for_cpu(1)
    assert "XLA_FLAGS" not in os.environ
    cli._host_devices_for_cpu(8)
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
    monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1 --xla_force_host_platform_device_count=4")
    cli._host_devices_for_cpu(8)  # a count the user set is kept
    assert os.environ["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"


# ---- end to end with a tiny UNet3D --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(pipeline_lib.save(tiny_unet_pipeline(), tmp_path_factory.mktemp("models") / "lavie-tiny"))


@pytest.fixture(scope="module")
def end_to_end(model_dir):
    """The end-to-end run's arguments (16 frames, LongDiff, 2 steps at 8x8; no --out): also the run without
    --precision of test_precision_flag_reaches_sample, so the two tests share one compiled program."""
    return ["sample", "--model", model_dir, "--prompt", PROMPTS[0], "--frames", "16", "--method", "longdiff",
            "--steps", "2", "--height", "8", "--width", "8", "--seed", "1", "--no-progress"]


def test_sample_end_to_end(end_to_end, tmp_path, capsys):
    common = end_to_end
    gif = tmp_path / "video.gif"
    assert cli.main(common + ["--out", str(gif)]) == 0
    frames = iio.imread(gif, index=None)
    assert frames.shape == (16, 8, 8, 3)
    assert f"wrote {gif}: 16 frames, 8x8" in capsys.readouterr().out
    png = tmp_path / "sheet.png"
    assert cli.main(common + ["--out", str(png), "--sheet-every", "4"]) == 0
    sheet = iio.imread(png)
    assert sheet.shape == (2 * 8 + 2, 2 * 8 + 2, 3)  # frames 0, 4, 8, 12 on a 2 x 2 grid, 2-pixel gaps
    np.testing.assert_array_equal(sheet[:8, :8], frames[0])  # the GIF kept every colour of these tiny frames
    np.testing.assert_array_equal(sheet[10:, 10:], frames[12])
    # the same run sharded over 8 devices (frames 4 x data 2): the real UNet3D's frame-pooled GroupNorms and
    # LongDiff attention give the same frames (uint8: at most one level apart where rounding flips)
    sharded = tmp_path / "sheet8.png"
    assert cli.main(common + ["--out", str(sharded), "--sheet-every", "4", "--devices", "8"]) == 0
    diff = np.abs(iio.imread(sharded).astype(int) - sheet.astype(int))
    assert diff.max() <= 1 and np.mean(diff) < 0.01
    assert np.std(frames) > 5  # a real picture, not a constant
    print(f"UNet3D longdiff sharded vs unsharded: max {diff.max()}, mean {np.mean(diff):.1e} (uint8 levels)")


def test_info(model_dir, capsys):
    assert cli.main(["info", "--model", model_dir]) == 0
    out = capsys.readouterr().out
    assert "family: lavie-tiny" in out and "UNet3DConfig" in out and "pixel space" in out
    assert "scheduler: ddim, linear betas 0.0001..0.02" in out
    total = sum(pipeline_lib.load(model_dir).num_parameters().values())
    assert f"(total {total:,})" in out
    assert cli.main(["info"]) == 0
    assert "methods: direct, freenoise" in capsys.readouterr().out


def test_user_errors_exit_1(model_dir, tmp_path, capsys):
    assert cli.main(["sample", "--model", str(tmp_path / "nope"), "--prompt", "p", "--out", "x.gif"]) == 1
    assert "no such pipeline directory" in capsys.readouterr().err
    assert cli.main(["sample", "--model", model_dir, "--prompt", "p", "--out", str(tmp_path / "x.avi")]) == 1
    assert "--out must end in one of" in capsys.readouterr().err
    assert cli.main(["sample", "--model", model_dir, "--prompt", "p", "--frames", "8", "--method", "longdif",
                     "--out", str(tmp_path / "x.gif")]) == 1
    assert "unknown method 'longdif'" in capsys.readouterr().err
    assert cli.main(["sample", "--model", model_dir, "--prompt", "p", "--height", "9",
                     "--out", str(tmp_path / "x.gif")]) == 1
    assert "multiples of 2" in capsys.readouterr().err


def test_method_defaults_to_auto_and_bench_takes_auto_and_time_plans():
    args = cli.build_parser().parse_args(["sample", "--prompt", "a red circle", "--out", "x.gif"])
    assert args.method == "auto"
    from jaxlongvid.bench import runner
    from jaxlongvid.methods import TIME_PRESETS

    methods = runner.parse_methods("auto,keepmotion,longdiff")
    assert methods[:2] == ["auto", TIME_PRESETS["keepmotion"]]
    assert [runner.method_label(m) for m in methods] == ["auto", "keepmotion", "longdiff"]
    with pytest.raises(ValueError, match="single presets only"):
        runner.parse_method("keepmotion:window=4")


def test_time_plan_specs_parse_to_time_plans():
    from jaxlongvid.bench import runner
    from jaxlongvid.methods import IFS, TIME_PRESETS, get_method

    plan = runner.parse_method("longdiff:noise=freenoise~0.25~freenoise")
    unnamed = [(end, m.replace(name="")) for end, m in plan.phases]
    assert unnamed == [(end, m.replace(name="")) for end, m in TIME_PRESETS["keepmotion"].phases]
    assert plan.name == "longdiff:noise=freenoise~0.25~freenoise"
    three = runner.parse_method("freenoise~0.2~longdiff:window=4~0.6~direct")
    assert [e for e, _ in three.phases] == [0.2, 0.6, 1.0]
    assert three.phases[1][1] == get_method("longdiff").replace(name="longdiff[window=4]", mask=IFS(window=4))
    for bad, match in (("longdiff~0.5", "METHOD~END"), ("longdiff~half~direct", "numbers"),
                       ("longdiff~0.5~auto", "single method"), ("longdiff~0.7~direct~0.5~direct", "increase")):
        with pytest.raises(ValueError, match=match):
            runner.parse_method(bad)

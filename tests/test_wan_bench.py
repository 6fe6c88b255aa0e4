"""benchmarks/wan_step.py runs (tiny model, CPU, one step, both implementations) and counts FLOPs as stated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import wan_step  # noqa: E402


def test_flop_count_of_the_1_3b_step():
    # 480x832, 81 frames: 21 x 30 x 52 = 32760 tokens; attention 4 S^2 D dominates; by hand below
    s, d, f, n, layers = 32760, 1536, 8960, 512, 30
    per_layer = 12 * s * d * d + 4 * s * s * d + 4 * n * d * d + 4 * s * n * d + 4 * s * d * f
    edges = 2 * s * 64 * d * 2 + 2 * n * (4096 * d + d * d)
    grid = wan_step.latent_grid(81, 480, 832)
    assert grid == (21, 60, 104)
    assert wan_step.step_flops(wan_step.SIZES["1.3b"], grid, 512, 2) == 2 * (layers * per_layer + edges)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        wan_step.latent_grid(80, 480, 832)


def test_tiny_benchmark_runs_on_cpu():
    pytest.importorskip("torch")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "wan_step.py"), "--size", "tiny", "--height",
                          "32", "--width", "32", "--frames", "5", "--dtype", "float32", "--repeats", "1", "--torch"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "jaxlongvid (xla)" in out.stdout and "diffusers (torch, SDPA)" in out.stdout
    assert "speed-up of jaxlongvid over diffusers" in out.stdout


def test_methods_benchmark_runs_tiny(capsys):
    """benchmarks/wan_methods.py in its tiny CPU mode: a timed row for direct and a method that acts (3 latent
    frames > the tiny native 2) under XLA and the block-sparse kernel (interpreted), and a failing row (an unknown
    method) reported as one SKIP line."""
    import wan_methods

    assert wan_methods.main(["--size", "tiny", "--height", "32", "--width", "32", "--frames", "9", "--dtype",
                             "float32", "--repeats", "1", "--text-len", "4", "--methods",
                             "direct,longdiff,nonesuch", "--attention", "xla,pallas"]) == 0
    rows = {tuple(line.split()[3:5]): line for line in capsys.readouterr().out.splitlines()
            if line.startswith("     9")}
    assert set(rows) == {(a, m) for a in ("xla", "pallas") for m in ("direct", "longdiff", "nonesuch")}
    assert float(rows["xla", "direct"].split()[6]) == 1.0 and float(rows["pallas", "longdiff"].split()[5]) > 0
    assert "SKIP ValueError: unknown method 'nonesuch'" in rows["xla", "nonesuch"]


def test_token_attention_benchmark_runs_tiny(capsys):
    """benchmarks/token_attention.py in its tiny CPU mode: rows for the jnp path and the block-sparse kernel
    (interpreted), the kernel's output within float32 rounding of the jnp path's."""
    import token_attention

    assert token_attention.main(["--latent", "6", "--rows", "2", "--cols", "3", "--heads", "2", "--dim", "24",
                                 "--dtype", "float32", "--attention", "jnp,pallas", "--repeats", "1", "--methods",
                                 "direct,freeloc"]) == 0
    rows = {tuple(line.split()[2:4]): line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("     6")}
    assert set(rows) == {(m, a) for m in ("direct", "freeloc") for a in ("jnp", "pallas")}
    assert float(rows["direct", "jnp"][5]) == 1.0 and float(rows["freeloc", "pallas"][4]) > 0
    assert all(float(row[7]) < 1e-5 for row in rows.values())

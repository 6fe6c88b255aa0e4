"""Test configuration: eight host CPU devices (for the sharding tests) and float32 everywhere."""
import os
import sys
import types

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def fake_converters(monkeypatch):
    """Stand-ins for the four ``convert.pipelines`` converters; returns the list of (name, kwargs) calls."""
    import convert

    calls = []
    fake = types.ModuleType("convert.pipelines")
    for name in ("convert_lavie", "convert_videocrafter", "convert_modelscope", "convert_wan"):
        setattr(fake, name, lambda _name=name, **kw: calls.append((_name, kw)) or kw["out"])
    monkeypatch.setitem(sys.modules, "convert.pipelines", fake)
    monkeypatch.setattr(convert, "pipelines", fake, raising=False)
    return calls


@pytest.fixture
def no_tracing(monkeypatch):
    """Fails a test whose request reaches the sampler's compiled loop (bad input must be refused before it)."""
    from jaxlongvid import sampling

    def fail(*a, **k):
        raise AssertionError("the request reached the compiled loop")

    monkeypatch.setattr(sampling, "_generate", fail)
    monkeypatch.setattr(sampling, "denoise", fail)

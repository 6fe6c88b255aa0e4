"""Test configuration: eight host CPU devices (for the sharding tests), float32 everywhere, and programs compiled
for compile time.

Most tests run tiny models once, so compiling is most of the suite's time: XLA compiles with most optimisations
off (``jax_disable_most_optimizations``: LLVM at -O0; measured on tests/test_wan_methods.py, 2 shared cores:
compile 42 -> 23 s, the file 51 -> 32 s). Every tolerance is unchanged (XLA CPU keeps fast math off at every
level; products and convolutions are library calls). Tests whose time is running a program many times (the
notebook's 64-frame samples: 96 -> 139 s unoptimised; the README snippet's 25 steps) take the
``optimized_compiles`` fixture. The setting is made here, not through the environment, so the commands the tests
start as subprocesses compile as a user's do."""
import os
import sys
import types

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(autouse=True, scope="module")
def fresh_compile_caches():
    """Each test file's compiled programs are dropped when it ends (files share almost none: a persistent cache
    hit 4 of 867 compiles). One whole-suite run with the setting above kept every file's and crashed inside
    XLA's compiler at 97% (a segmentation fault in test_wan_vae.py, which passes alone)."""
    yield
    jax.clear_caches()


@pytest.fixture
def optimized_compiles():
    """XLA's optimisations back on for one test (programs it compiles run at full speed)."""
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", True)


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

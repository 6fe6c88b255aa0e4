"""Timing one compiled program, as the GPU benchmarks under ``benchmarks/`` report it."""

from __future__ import annotations

import statistics
import time

import jax


def time_compiled(fn, *args, repeats: int, warmup: int = 1) -> dict:
    """Compile the jitted ``fn`` for ``args``, run it ``warmup`` times, then time ``repeats`` runs.

    Returns ``seconds`` (the median run), ``compile_s``, ``need`` (the compiled program's arguments, outputs and
    temporaries in bytes, None where the backend does not say), ``peak`` (the device's peak bytes in use so far,
    None on a CPU), ``hlo`` (the compiled program's text, to count the kernels that ran) and ``output`` (the
    last run's result, to compare layouts)."""
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    need = None if mem is None else mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times, output = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        output = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    stats = jax.devices()[0].memory_stats() or {}
    return dict(seconds=statistics.median(times), compile_s=compile_s, need=need,
                peak=stats.get("peak_bytes_in_use"), hlo=compiled.as_text(), output=output)

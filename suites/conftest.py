"""pytest-benchmark suites over stbench cases: the grid follows the device; records go to extra_info and a file.

Each benchmark measures one case with the stbench engine (`stbench.runner.run_case`: a fresh model, memory,
saved activations, FLOPs, environment) whose timed steps are run by pytest-benchmark's `pedantic`, so one
set of step samples feeds both the benchmark statistics and the stbench record. A training step ends with a
device synchronisation, so on CUDA the GPU work is timed, not the kernel launches.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest

from suites import grid

SUITE_FAMILIES = {"test_unet": "unet", "test_dit": "dit", "test_video_transformer": "video-transformer"}


def pytest_addoption(parser):
    group = parser.getgroup("stbench", "stbench suites (each option also reads the env var named in its help)")
    for name, (env_var, help_text) in grid.OPTIONS.items():
        group.addoption(f"--stbench-{name}", default=None, action="append" if name == "set" else "store",
                        help=f"{help_text}; env {env_var}")
    group.addoption("--stbench-trace", action="store_true", default=None,
                    help="also write a torch.profiler trace per case beside the results file; env STBENCH_TRACE=1")


def _get_option(config):
    def get(name):
        value = config.getoption(f"--stbench-{name}")
        return value if value not in (None, "") else grid.env_get(name)
    return get


GRID_KEY = pytest.StashKey[grid.GridSpec]()


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's own configure reads --benchmark-disable
def pytest_configure(config):
    # Collected as tests (`pytest tests suites`, without --benchmark-only or --benchmark-enable), every case is a
    # smoke test with the same assertions: the engine's warm-up, then one timed step instead of --stbench-rounds
    # (pytest-benchmark disabled), at the grid's fewest frames unless --stbench-frames names them (more frames run
    # the same code on a longer sequence); --benchmark-only benchmarks the grid.
    smoke = not config.getoption("benchmark_only", False) and not config.getoption("benchmark_enable", False)
    if smoke:
        config.option.benchmark_disable = True
    try:
        get = _get_option(config)
        spec = grid.grid_spec(get)
        if smoke and get("frames") is None:
            spec = dataclasses.replace(spec, frames=(min(spec.frames),))
        grid.check_archs(spec)
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    config.stash[GRID_KEY] = spec


@pytest.fixture(autouse=True, scope="module")
def _freeze_what_earlier_modules_left():
    """Each case's gc.collect() (stbench.measure.memory) scans only what this module made."""
    from stbench.measure.memory import collect_and_freeze

    collect_and_freeze()


@pytest.fixture(autouse=True)
def _one_thread_as_a_test(pytestconfig):
    """Collected as tests (pytest-benchmark disabled), a case times nothing that matters: one intra-op thread, as
    in tests/, since two spin at OpenMP's barriers while other work holds one of the cores (a tiny UNet step
    took 5 s instead of 40 ms on 2 cores)."""
    import torch

    threads = torch.get_num_threads()
    if pytestconfig.option.benchmark_disable:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def stbench_grid(pytestconfig) -> grid.GridSpec:
    return pytestconfig.stash[GRID_KEY]


def pytest_generate_tests(metafunc):
    if "stbench_case" not in metafunc.fixturenames:
        return
    family = SUITE_FAMILIES.get(metafunc.function.__name__)
    if family is None:
        raise pytest.UsageError(f"{metafunc.function.__name__}: not a known stbench suite")
    entries = grid.family_entries(family, metafunc.config.stash[GRID_KEY])
    params = [pytest.param(e.case, id=e.id, marks=[pytest.mark.skip(reason=e.skip_reason)] if e.skip_reason
                           else []) for e in entries]
    metafunc.parametrize("stbench_case", params)


def _trace_enabled(config) -> bool:
    return bool(config.getoption("--stbench-trace")) or os.environ.get("STBENCH_TRACE", "") not in ("", "0")


@pytest.fixture
def run_stbench_case(benchmark, stbench_grid, pytestconfig):
    """`run_stbench_case(case) -> record`: benchmark one case, record it, skip it when it ran out of memory."""
    from stbench import results, runner
    from stbench.measure import timing

    def run(case):
        import architectures

        # one table per shape, so the architectures that compete on it sit side by side
        benchmark.group = (f"{architectures.get(case.arch).family} {case.mode} r{case.resolution} f{case.frames} "
                           f"b{case.batch} {case.dtype}")
        def time_with_benchmark(step, repeats, device, **_):
            # Replaces the engine's timing loop for this case: pytest-benchmark runs the measured steps.
            samples = []

            def one_step():
                t0 = time.perf_counter()
                step()  # forward, backward, optimizer step, zero_grad; synchronises the device at the end
                samples.append((time.perf_counter() - t0) * 1e3)

            benchmark.pedantic(one_step, setup=step.synchronize, rounds=repeats, warmup_rounds=0, iterations=1)
            stats = getattr(benchmark, "stats", None)
            if stats is not None and stats.stats.data:  # None with --benchmark-disable: one untimed run
                samples = [1e3 * s for s in stats.stats.data]
            return timing.StepTimes(samples)

        trace_dir = Path(stbench_grid.out).parent / "traces" if _trace_enabled(pytestconfig) else None
        record = runner.run_case(case, repeats=stbench_grid.rounds, warmup=stbench_grid.warmup,
                                 trace_dir=trace_dir, time_steps=time_with_benchmark)
        record["warnings"].append("timed by pytest-benchmark (suites/)" if benchmark.enabled else
                                  "pytest-benchmark disabled: a single step timed (suites/)")
        results.append_record(stbench_grid.out, record)
        benchmark.extra_info.update(record)
        slug = results.case_slug(record)
        if record["status"] == "oom":
            pytest.skip(f"{slug}: out of memory (recorded as oom): {(record['error'] or '').splitlines()[0]}")
        if record["status"] != "ok":
            pytest.fail(f"{slug}: {record['status']}:\n{record['error']}", pytrace=False)
        return record

    return run

"""Timing helpers shared by the benchmarks in evaluation/benchmarks/: medians of timed calls (with a time budget),
variants timed in alternation, the machine's fp32 matmul rate, FLOP counts, and how busy the machine was.

On a small shared machine other processes skew every timing, so the helpers keep the median of several calls,
interleave the variants being compared, and report the load around the run.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import torch
from torch.utils.flop_counter import FlopCounterMode

MATMUL_SIZE = 2048


class StepTooSlow(Exception):
    """One call of a step took longer than the whole time budget of its measurement."""


class Median(NamedTuple):
    """Medians over the timed calls of one function."""

    seconds: float
    page_faults: float  # minor page faults per call (0 where the resource module is missing)


def _check_repeats(repeats: int) -> None:
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1 (timed calls whose median is kept), got {repeats}")


def run_times(fn: Callable[[], object], warmup: int, repeats: int,
              clock: Callable[[], float] | None = None) -> list[float]:
    """Seconds of each of `repeats` calls of fn, after `warmup` untimed ones (`clock`: see interleaved_medians)."""
    clock = clock or time.perf_counter
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return times


def median_seconds(fn: Callable[[], object], warmup: int, repeats: int, budget_s: float = math.inf,
                   label: str = "step") -> float:
    """Median seconds of fn over `repeats` calls after `warmup` untimed ones.

    With a finite `budget_s` (about how long the timed calls of this measurement may take) the first warm-up call is
    timed: a step slower than the whole budget raises StepTooSlow naming `label`, and a slow step gets only as many
    timed calls (at least 3) as fit in the budget, after that single warm-up (one long call is warm-up enough).
    """
    _check_repeats(repeats)
    if budget_s == math.inf:
        return statistics.median(run_times(fn, warmup, repeats))
    if warmup < 1:
        raise ValueError(f"a time budget needs warmup >= 1 (the first warm-up call is timed), got {warmup}")
    (first,) = run_times(fn, 0, 1)
    if first > budget_s:
        raise StepTooSlow(f"one {label} took {first:.1f} s (over the budget of {budget_s:g} s)")
    if first * repeats <= budget_s:
        return statistics.median(run_times(fn, warmup - 1, repeats))
    return statistics.median(run_times(fn, 0, min(repeats, max(3, int(budget_s / first)))))


def minor_page_faults() -> int:
    """Minor page faults of this process so far (0 where the resource module is missing)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def interleaved_medians(fns: dict[str, Callable[[], object]], warmup: int, repeats: int,
                        clock: Callable[[], float] | None = None) -> dict[str, Median]:
    """Median seconds and minor page faults per call of each function, called in turn (A, B, A, B, ...) for
    `warmup` untimed rounds and then `repeats` timed ones, so that a busy spell slows all of them alike.
    `clock=time.process_time` counts this process's CPU seconds instead of wall-clock ones: on an oversubscribed
    machine with one torch thread that leaves out the time other processes hold the core."""
    clock = clock or time.perf_counter
    _check_repeats(repeats)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times, faults = {name: [] for name in fns}, {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            faults_before = minor_page_faults()  # read outside the timed span
            start = clock()
            fn()
            times[name].append(clock() - start)
            faults[name].append(minor_page_faults() - faults_before)
    return {name: Median(statistics.median(times[name]), statistics.median(faults[name])) for name in fns}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmul-like ops fn runs (FlopCounterMode: linear, conv, bmm; not norms, activations, softmax)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_gflops(warmup: int, repeats: int, size: int = MATMUL_SIZE,
                  clock: Callable[[], float] | None = None) -> float:
    """The rate of one large fp32 matmul: what the BLAS reaches on this machine with these threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    with torch.inference_mode():
        seconds = statistics.median(run_times(lambda: a @ b, warmup, repeats, clock))
    return 2 * size**3 / seconds / 1e9


def _busy_core_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat; None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_core_seconds() -> float:
    """CPU seconds of this process and of its finished children (a benchmark may time in child processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class MachineLoad:
    """How busy the machine was around a benchmark: `with MachineLoad() as load: ...`, then `load.load_before`,
    `load.load_after` (1-minute load averages), `load.wall_s` and `load.background`: the share of all the machine's
    core-seconds that other processes took during the run (Linux; None elsewhere). With every core in use by the
    benchmark's threads, even a few % of background slows the timings a lot."""

    def __enter__(self) -> MachineLoad:
        self.load_before = os.getloadavg()[0]
        self.load_after = self.wall_s = self.background = None
        self._busy, self._own = _busy_core_seconds(), _own_core_seconds()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        self.wall_s = time.perf_counter() - self._started
        self.load_after = os.getloadavg()[0]
        if self._busy is not None:
            other = _busy_core_seconds() - self._busy - (_own_core_seconds() - self._own)
            self.background = max(0.0, other) / (self.wall_s * os.cpu_count())

"""The shared benchmark timing helpers (hfpapers.testing.benchmark), on fake clocks and trivial functions."""

import time
from types import SimpleNamespace

import pytest
import torch

from hfpapers.testing import benchmark


class FakeClock:
    """perf_counter that only moves when a timed function says how long it took."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(benchmark, "time", SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


def steps(clock, durations, calls):
    """A function whose n-th call takes durations[n] seconds on the fake clock; `calls` records each call."""
    durations = iter(durations)

    def fn():
        calls.append(clock.now)
        clock.now += next(durations)

    return fn


def test_median_of_a_known_sleep():
    seconds = benchmark.median_seconds(lambda: time.sleep(0.01), warmup=1, repeats=5)
    assert 0.01 <= seconds < 0.03


def test_median_skips_warmup_calls(clock):
    calls = []
    # two warm-up calls of 100 s must not count; the median of 3, 1, 2 is 2
    fn = steps(clock, [100, 100, 3, 1, 2], calls)
    assert benchmark.median_seconds(fn, warmup=2, repeats=3) == 2
    assert len(calls) == 5


def test_budget_keeps_every_repeat_of_a_fast_step(clock):
    calls = []
    fn = steps(clock, [0.1] * 12, calls)
    # 0.1 s x 10 repeats fits in 5 s: the timed first warm-up, 1 more warm-up, 10 timed calls
    assert benchmark.median_seconds(fn, warmup=2, repeats=10, budget_s=5) == pytest.approx(0.1)
    assert len(calls) == 12


def test_budget_stops_a_slow_step_early(clock):
    calls = []
    fn = steps(clock, [2, 4, 1, 3] + [99] * 10, calls)
    # a 2 s step: only max(3, int(5 / 2)) = 3 timed calls after the single (timed) warm-up; median of 4, 1, 3
    assert benchmark.median_seconds(fn, warmup=2, repeats=10, budget_s=5) == 3
    assert len(calls) == 4


def test_budget_refuses_a_step_longer_than_the_budget(clock):
    calls = []
    fn = steps(clock, [6] * 5, calls)
    with pytest.raises(benchmark.StepTooSlow, match=r"one train step took 6\.0 s \(over the budget of 5 s\)"):
        benchmark.median_seconds(fn, warmup=2, repeats=10, budget_s=5, label="train step")
    assert len(calls) == 1


def test_bad_repeats_and_warmup_are_refused():
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        benchmark.median_seconds(lambda: None, warmup=1, repeats=0)
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        benchmark.interleaved_medians({"a": lambda: None}, warmup=1, repeats=0)
    with pytest.raises(ValueError, match="a time budget needs warmup >= 1"):
        benchmark.median_seconds(lambda: None, warmup=0, repeats=3, budget_s=5)


def test_interleaved_calls_alternate_and_medians_are_per_function(clock):
    order = []

    def timed(name, seconds):
        def fn():
            order.append(name)
            clock.now += seconds.pop(0)
        return fn

    # warm-up rounds take 50 s and must not count; then A takes 1, 5, 2 s and B 10, 30, 20 s
    medians = benchmark.interleaved_medians(
        {"A": timed("A", [50, 1, 5, 2]), "B": timed("B", [50, 10, 30, 20])}, warmup=1, repeats=3)
    assert order == ["A", "B"] * 4
    assert medians["A"].seconds == 2 and medians["B"].seconds == 20


@pytest.mark.skipif(benchmark.resource is None, reason="no resource module (Windows)")
def test_interleaved_page_faults_count_fresh_memory():
    import mmap

    size = 64 * 2**20

    def touch_fresh_pages():  # anonymous pages from the kernel, each written once: a fault per page (or per huge
        with mmap.mmap(-1, size) as memory:  # page); malloc could hand back pages a long-lived process already has
            for offset in range(0, size, mmap.PAGESIZE):
                memory[offset] = 1

    medians = benchmark.interleaved_medians({"alloc": touch_fresh_pages, "noop": lambda: None}, warmup=1, repeats=3)
    # at least one fault per 2 MiB (transparent huge pages fault in that much at once; 4 KiB pages give 16,384)
    assert medians["alloc"].page_faults >= size // 2**21 > medians["noop"].page_faults


def test_count_flops_of_a_matmul():
    a, b = torch.randn(2, 3), torch.randn(3, 4)
    assert benchmark.count_flops(lambda: a @ b) == 2 * 2 * 3 * 4


def test_matmul_gflops_from_the_median_time(monkeypatch):
    ticks = iter(range(100))  # every perf_counter read is 0.5 s after the last: each timed call takes 0.5 s
    monkeypatch.setattr(benchmark, "time", SimpleNamespace(perf_counter=lambda: 0.5 * next(ticks)))
    assert benchmark.matmul_gflops(warmup=1, repeats=3, size=8) == pytest.approx(2 * 8**3 / 0.5 / 1e9)


def test_machine_load_reports_wall_time_and_background():
    with benchmark.MachineLoad() as load:
        end = time.perf_counter() + 0.05
        while time.perf_counter() < end:
            pass
    assert load.wall_s >= 0.05
    assert load.load_before >= 0 and load.load_after >= 0
    assert load.background is None or load.background >= 0

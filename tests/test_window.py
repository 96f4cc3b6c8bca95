"""The in-flight window sized by measurement, with a fake clock: no cluster."""

from __future__ import annotations

import pytest

from imgtasks.window import BatchSizing, Finished, Window


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def batch(latency: float, cpu: float, size: int = 16, image_bytes: int = 32_000, **kw) -> Finished:
    options = {
        "entries": size,
        "fetched": size,
        "download_s": latency * size,
        "download_wall_s": latency,
        "thumbnail_wall_s": cpu,
        "bytes_in": image_bytes * size,
        "turnaround_s": latency + cpu,
        "thumbnail_cpu_s": cpu,
    }
    return Finished(**(options | kw))


def feed(window: Window, clock: Clock, done: Finished, n: int = 30, gap: float = 0.05) -> int:
    for _ in range(n):
        clock.now += gap
        window.observe(done, window.target() - 1)
    return window.target()


def test_littles_law_more_in_flight_at_higher_latency() -> None:
    # Two CPU slots at 80 ms a batch (16 web-size images): 25 batches/s between them.
    targets = {}
    for latency in (0.1, 0.5, 1.0):
        clock = Clock()
        window = Window(2, 32, start=16, clock=clock)
        targets[latency] = feed(window, clock, batch(latency, 0.08), gap=0.04)
    assert targets[0.1] < targets[0.5] < targets[1.0]
    assert targets[1.0] >= 2 * 2 + 25 * 1.0  # CPU throughput x latency, plus the CPU's own
    assert targets[1.0] <= 32 + 4  # no more than the I/O pool can download at once


def test_the_start_until_measured_and_a_fixed_window_always() -> None:
    assert Window(2, 32, start=16).target() == 16
    fixed = Window(2, 32, start=16, fixed=5)
    fixed.observe(batch(1.0, 0.08), 4)
    assert fixed.target() == 5


def test_the_memory_budget_bounds_it() -> None:
    clock = Clock()
    window = Window(2, 32, start=16, max_bytes=64 * 2**20, clock=clock)
    # 16 photos of 2.5 MB a batch: 40 MB, so the budget holds one batch and a bit
    target = feed(window, clock, batch(1.0, 0.08, image_bytes=2_500_000), gap=0.04)
    assert target == window.floor == 3


def test_it_shrinks_when_the_cpu_pool_is_the_bottleneck() -> None:
    clock = Clock()
    window = Window(2, 32, start=16, clock=clock)
    # CPU 0.5 s a batch, every slot always busy (a batch every 0.25 s), and batches
    # waiting for it: 2 s from submission to report where 0.6 s is work.
    saturated = batch(0.1, 0.5, turnaround_s=2.0)
    target = feed(window, clock, saturated, n=40, gap=0.25)
    assert target < 16
    # down to Little's law without headroom (2 x 2 slots + 4 batches/s x 0.1 s), not below:
    # fewer and a slot that finishes may find nothing downloaded
    assert target == window.little(headroom=1.0) == 5


def test_it_grows_past_the_formula_while_the_cpu_waits_with_the_window_full() -> None:
    clock = Clock()
    window = Window(2, 32, start=16, clock=clock)
    starved = batch(0.1, 0.05)  # the formula says few; the CPU is busy 10 % of the time
    first = feed(window, clock, starved, n=3, gap=0.25)
    assert feed(window, clock, starved, n=20, gap=0.25) > first


def finished_batch(urls: int, per_url_s: float, wall_per_url_s: float | None = None) -> Finished:
    wall = urls * (wall_per_url_s or per_url_s)
    return Finished(urls, urls, 0.1, 0.1, wall, urls * 30_000, 0.2, urls * per_url_s)


def test_batch_sizes_grow_to_the_target_work_at_most_doubling() -> None:
    sizing = BatchSizing(start=16, ceiling=128, target_s=0.25)
    sizes = [sizing()]
    for _ in range(5):
        sizing.observe(finished_batch(sizes[-1], 0.004))  # web-size: 4 ms a URL
        sizes.append(sizing())
    assert sizes == [16, 32, 62, 62, 62, 62]  # 0.25 s / 4 ms, reached by doubling


def test_batch_sizes_stay_at_the_ceiling_and_the_start() -> None:
    quick, slow = BatchSizing(16, 128, 0.25), BatchSizing(16, 128, 0.25)
    for _ in range(6):
        quick.observe(finished_batch(quick(), 0.0005))  # tiny images
        slow.observe(finished_batch(slow(), 0.05))  # 12 MP photos: 16 are 0.8 s of work
    assert (quick(), slow()) == (128, 16)


def test_batch_sizes_shrink_when_the_images_get_heavier() -> None:
    sizing = BatchSizing(16, 128, 0.25)
    for _ in range(6):
        sizing.observe(finished_batch(sizing(), 0.001))
    assert sizing() == 128
    for _ in range(20):
        sizing.observe(finished_batch(sizing(), 0.01))
    assert sizing() == 25


def test_batch_sizes_follow_the_nodes_cpu_not_their_wall_time() -> None:
    """On a loaded machine a thumbnail node waits for a core: 1.7 ms of CPU per web-size
    image took 6 ms of wall. Sized by wall, batches stopped at 42 URLs, whose overhead
    loaded the machine further; sized by CPU they reach the ceiling."""
    sizing = BatchSizing(16, 128, 0.25)
    for _ in range(6):
        sizing.observe(finished_batch(sizing(), 0.0017, wall_per_url_s=0.006))
    assert sizing() == 128


def test_a_workers_slow_first_batch_does_not_keep_batches_small() -> None:
    """Each CPU worker's first batch costs ~0.5 s more (first decoders, first manifest
    part): 16 ms per URL instead of 2.5. Sizes follow the median of recent batches, so
    two such batches are forgotten once the next ones agree (a mean still said ~6 ms)."""
    sizing = BatchSizing(16, 128, 0.25)
    for per_url in (0.016, 0.016, 0.0025, 0.0025, 0.0025, 0.0025, 0.0025, 0.0025):
        sizing.observe(finished_batch(sizing(), per_url))
    assert sizing() == 100  # 0.25 s / 2.5 ms


def test_a_batch_with_nothing_downloaded_says_nothing_about_sizes() -> None:
    sizing = BatchSizing(16, 128, 0.25)
    sizing.observe(Finished(16, 0, 0.0, 0.0, 0.002, 0, 0.01, 0.002))  # all resumed or invalid
    assert sizing() == 16
    with pytest.raises(ValueError, match="start <= ceiling"):
        BatchSizing(64, 32)

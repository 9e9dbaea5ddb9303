"""The one timing harness of the benchmarks: warm-up calls first, then the variants run in turns (round after
round), so that drift of the machine's speed (large on shared VMs) hits them alike and their ratios mean something."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from ..errors import InvalidArgumentError


@dataclass
class Timings:
    """Seconds of every timed call per variant (``samples``) and each variant's last result (``results``)."""

    samples: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)

    def best(self, name: str) -> float:
        return min(self.samples[name])

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])


def time_in_turns(fns: dict, rounds: int = 3, warmup: int = 1) -> Timings:
    """Call each of ``fns`` (name -> zero-argument callable) ``warmup`` times untimed (first-call costs: kernel
    builds, compilation, caches, allocator), then ``rounds`` times timed, one call of each variant per round."""
    if rounds < 1 or warmup < 0:
        raise InvalidArgumentError(f"rounds must be >= 1 and warmup >= 0, got rounds={rounds!r}, warmup={warmup!r}")
    timings = Timings({name: [] for name in fns})
    for _ in range(warmup):
        for name, fn in fns.items():
            timings.results[name] = fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            timings.results[name] = fn()
            timings.samples[name].append(time.perf_counter() - start)
    return timings


def time_call(fn, rounds: int = 3, warmup: int = 1) -> tuple[float, object]:
    """(best seconds, last result) of one callable, with the same warm-up and rounds as `time_in_turns`."""
    timings = time_in_turns({"fn": fn}, rounds, warmup)
    return timings.best("fn"), timings.results["fn"]

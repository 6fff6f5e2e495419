"""The one timing helper every benchmark in tools/ uses: candidates timed in interleaved rounds.

These machines are shared and noisy, so a benchmark never compares two numbers measured minutes
apart: each round runs every candidate once, back to back in a rotated order, and a ratio is the
median over rounds of the per-round ratio. Wall-clock and process CPU time are both kept: CPU time
counts the work done rather than the wait for a core, so it is the steadier figure on a busy machine.
"""

import statistics
import time


def time_interleaved(candidates, rounds=5, sync=None):
    """{name: [(wall seconds, cpu seconds) per round]} for {name: callable}; round 0 warms up.

    sync: called after each candidate before the clock stops (torch.cuda.synchronize on a GPU)."""
    times = {name: [] for name in candidates}
    names = list(candidates)
    for round_ in range(rounds + 1):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            wall, cpu = time.perf_counter(), time.process_time()
            candidates[name]()
            if sync is not None:
                sync()
            if round_:
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def median(times, which=0):
    """Median seconds over rounds: which=0 wall-clock, 1 CPU."""
    return statistics.median(t[which] for t in times)


def ratio(times, reference, which=0):
    """Median over rounds of the per-round ratio times / reference (robust to load drifting)."""
    return statistics.median(a[which] / b[which] for a, b in zip(times, reference, strict=True))


def show(times):
    """'  12.3 ms wall   24.1 ms cpu' for one candidate's rounds."""
    return f"{median(times) * 1e3:8.2f} ms wall {median(times, 1) * 1e3:8.2f} ms cpu"

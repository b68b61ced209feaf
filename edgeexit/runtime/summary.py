"""Run statistics of ``edgeexit run``: counts, exit histogram, accuracy, latency percentiles, throughput, cost.

Memory stays flat on endless runs: counters plus a fixed-size latency reservoir (exact percentiles up to
``LATENCY_RESERVOIR`` frames, a uniform random sample of all frames after that; mean, min and max stay exact).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

import numpy as np

__all__ = ["LatencyStats", "RunStats", "LATENCY_RESERVOIR"]

LATENCY_RESERVOIR = 1 << 16


class LatencyStats:
    """Streaming latency statistics (milliseconds) with a bounded reservoir for percentiles."""

    def __init__(self, capacity: int = LATENCY_RESERVOIR, seed: int = 0):
        self.capacity = int(capacity)
        self._values = np.empty(self.capacity, dtype=np.float64)
        self._rng = np.random.default_rng(seed)
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, ms: float) -> None:
        ms = float(ms)
        if not math.isfinite(ms):
            return
        if self.count < self.capacity:
            self._values[self.count] = ms
        else:  # reservoir sampling (Vitter's algorithm R)
            j = int(self._rng.integers(0, self.count + 1))
            if j < self.capacity:
                self._values[j] = ms
        self.count += 1
        self.total += ms
        self.min = min(self.min, ms)
        self.max = max(self.max, ms)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")

    def percentile(self, q: float) -> float:
        if not self.count:
            return float("nan")
        return float(np.percentile(self._values[: min(self.count, self.capacity)], q))

    def to_dict(self) -> Dict[str, Optional[float]]:
        def r(v: float) -> Optional[float]:
            return round(v, 4) if math.isfinite(v) else None

        return {
            "mean": r(self.mean), "p50": r(self.percentile(50)), "p95": r(self.percentile(95)),
            "p99": r(self.percentile(99)), "min": r(self.min), "max": r(self.max), "count": self.count,
        }


class RunStats:
    """Everything the run summary reports. ``exit_fractions[i]``: cost of leaving at exit i as a fraction of the
    plain network (cumulative MACs / reference MACs)."""

    def __init__(self, num_exits: int, exit_fractions: Optional[Sequence[float]] = None, full: bool = False):
        self.num_exits = int(num_exits)
        self.exit_fractions = list(exit_fractions) if exit_fractions is not None else None
        self.full = bool(full)
        self.frames = 0  # frames decided (failed ones included)
        self.failed = 0
        self.skipped = 0
        self.dropped = 0
        self.exit_counts = [0] * self.num_exits
        self.labelled = 0
        self.correct = 0
        self.cost_sum = 0.0  # sum of cost fractions of decided frames
        self.latency = LatencyStats()
        self.failure_reasons: Dict[str, int] = {}
        self.interrupted = False
        self.ended_reason: Optional[str] = None
        self._t0: Optional[float] = None
        self._t1: Optional[float] = None

    # -- recording ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        self._t1 = time.perf_counter()

    @property
    def elapsed_s(self) -> float:
        if self._t0 is None:
            return 0.0
        end = self._t1 if self._t1 is not None else time.perf_counter()
        return max(0.0, end - self._t0)

    def add(self, decision: Any, label: Optional[int] = None) -> None:
        """Record one decision (a chain ``Decision``) and the true label when known."""
        self.start()
        self.frames += 1
        if label is not None:
            self.labelled += 1
        if decision.failed:
            self.failed += 1
            key = (decision.failed or "failed").split(" (")[0]
            self.failure_reasons[key] = self.failure_reasons.get(key, 0) + 1
            return
        i = int(decision.exit)
        if 0 <= i < self.num_exits:
            self.exit_counts[i] += 1
        if label is not None and int(decision.class_id) == int(label):
            self.correct += 1
        if self.full:
            self.cost_sum += 1.0
        elif self.exit_fractions is not None and 0 <= i < len(self.exit_fractions):
            self.cost_sum += float(self.exit_fractions[i])
        self.latency.add(decision.latency_ms)

    def add_skipped(self, n: int = 1) -> None:
        self.skipped += int(n)

    # -- results -----------------------------------------------------------------------------------------------

    @property
    def decided(self) -> int:
        return self.frames - self.failed

    @property
    def accuracy(self) -> Optional[float]:
        """Correct / frames with a known label (failed frames count as wrong); None without labels."""
        return self.correct / self.labelled if self.labelled else None

    @property
    def mean_cost(self) -> Optional[float]:
        """Mean cost of the decided frames as a fraction of the plain network."""
        if not self.decided or (self.exit_fractions is None and not self.full):
            return None
        return self.cost_sum / self.decided

    @property
    def fps(self) -> Optional[float]:
        t = self.elapsed_s
        return self.frames / t if t > 0 and self.frames else None

    def to_dict(self) -> Dict[str, Any]:
        cost = self.mean_cost
        acc = self.accuracy
        fps = self.fps
        return {
            "frames": self.frames,
            "dropped": self.dropped,
            "skipped": self.skipped,
            "failed": self.failed,
            "exit_histogram": list(self.exit_counts),
            "accuracy": None if acc is None else round(acc, 6),
            "labelled": self.labelled,
            "latency_ms": self.latency.to_dict(),
            "fps": None if fps is None else round(fps, 3),
            "elapsed_s": round(self.elapsed_s, 4),
            "mean_cost_pct": None if cost is None else round(100 * cost, 3),
            "saving_pct": None if cost is None else round(100 * (1 - cost), 3),
            "full": self.full,
            "interrupted": self.interrupted,
            "ended": self.ended_reason,
            "failure_reasons": dict(self.failure_reasons),
        }

    def rows(self) -> List[Tuple[str, str]]:
        """(metric, value) rows of the summary table."""
        d = self.to_dict()
        rows: List[Tuple[str, str]] = [
            ("frames", str(self.frames)),
            ("dropped (live source)", str(self.dropped)),
            ("skipped (unreadable)", str(self.skipped)),
            ("failed (engine output)", str(self.failed)),
        ]
        decided = max(self.decided, 1)
        for i, n in enumerate(self.exit_counts):
            fraction = self.exit_fractions[i] if self.exit_fractions is not None and i < len(self.exit_fractions) else 0.0
            if not self.full and n == 0 and fraction != fraction:  # nan: an exit the deployed stages do not keep
                continue
            cost = ""
            if self.exit_fractions is not None and not self.full and i < len(self.exit_fractions):
                cost = f", {100 * self.exit_fractions[i]:.1f}% MACs"
            last = " (last)" if i == self.num_exits - 1 else ""
            rows.append((f"exit {i}{last}{cost}", f"{n} ({100 * n / decided:.1f}%)"))
        acc = self.accuracy
        rows.append(("accuracy", "n/a (no labels)" if acc is None else f"{100 * acc:.2f}% ({self.correct}/{self.labelled})"))
        lat = d["latency_ms"]

        def ms(v: Optional[float]) -> str:
            return "n/a" if v is None else f"{v:.3f}"

        rows.append(("latency mean / p50 ms", f"{ms(lat['mean'])} / {ms(lat['p50'])}"))
        rows.append(("latency p95 / p99 ms", f"{ms(lat['p95'])} / {ms(lat['p99'])}"))
        rows.append(("throughput", "n/a" if d["fps"] is None else f"{d['fps']:.1f} fps ({self.elapsed_s:.2f} s)"))
        if d["mean_cost_pct"] is None:
            rows.append(("mean cost", "n/a"))
        else:
            rows.append(("mean cost (% of plain network)", f"{d['mean_cost_pct']:.1f}%"))
            rows.append(("saving vs full depth", f"{d['saving_pct']:.1f}%"))
        for reason, n in sorted(self.failure_reasons.items(), key=lambda kv: -kv[1])[:3]:
            rows.append(("failure", f"{n}x {reason}"))
        if self.interrupted:
            rows.append(("status", "interrupted"))
        elif self.ended_reason:
            rows.append(("ended", self.ended_reason))
        return rows

    def render(self, file: Optional[TextIO] = None, title: str = "edgeexit run") -> None:
        """Print the summary table (rich when available, else plain text) to ``file`` (default stderr)."""
        file = file if file is not None else sys.stderr
        rows = self.rows()
        try:
            from rich.console import Console  # noqa: PLC0415
            from rich.table import Table  # noqa: PLC0415
        except ImportError:  # pragma: no cover - rich is a dependency
            width = max(len(k) for k, _ in rows)
            print(title, file=file)
            for k, v in rows:
                print(f"  {k:<{width}}  {v}", file=file)
            file.flush()
            return
        table = Table(show_header=False)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in rows:
            table.add_row(k, v)
        console = Console(file=file, width=max(80, min(120, 4 + max(len(k) + len(v) + 7 for k, v in rows))),
                          highlight=False)
        console.print(title, soft_wrap=True)  # a line of its own: a table title would wrap at the table's width
        console.print(table)
        file.flush()

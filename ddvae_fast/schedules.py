"""Training schedules (Appendix B): beta grows linearly, tau anneals log-linearly.

Each schedule is a small callable of the step (an epoch or an iteration, the
caller's choice): constant ``start`` before ``begin``, a ramp to ``end`` over
[begin, begin + duration], then constant ``end``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class _Ramp:
    start: float
    end: float
    duration: float
    begin: float = 0.0

    def __post_init__(self):
        for field in ("start", "end", "duration", "begin"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{field} must be a finite number, got {value!r}")
        if self.duration < 0:
            raise ValueError(f"duration must be >= 0, got {self.duration}")

    def _fraction(self, step: float) -> float:
        if self.duration == 0:
            return 0.0 if step < self.begin else 1.0
        return min(max((step - self.begin) / self.duration, 0.0), 1.0)


class LinearSchedule(_Ramp):
    """start + (end - start) * fraction: the beta (KL weight) schedule."""

    def __call__(self, step: float) -> float:
        return self.start + (self.end - self.start) * self._fraction(step)


class LogLinearSchedule(_Ramp):
    """Linear in log space, start * (end / start) ** fraction: the temperature schedule."""

    def __post_init__(self):
        super().__post_init__()
        if self.start <= 0 or self.end <= 0:
            raise ValueError(
                f"a log-linear schedule needs positive endpoints, got {self.start}, {self.end}"
            )

    def __call__(self, step: float) -> float:
        frac = self._fraction(step)
        return math.exp(math.log(self.start) + (math.log(self.end) - math.log(self.start)) * frac)

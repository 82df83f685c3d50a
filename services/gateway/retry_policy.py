"""When failed work is tried again: exponential backoff within a budget of time, not a count of attempts.

A stage service that restarts, or Triton reloading its models, makes every call fail for a while; attempts
spent in milliseconds would fail the job during an outage the budget is meant to wait out.
"""

from __future__ import annotations

from dataclasses import dataclass

# 2**60 backoffs are long past any max_backoff_seconds; the cap keeps the power a finite float.
_MAX_DOUBLINGS = 60


@dataclass(frozen=True)
class RetryPolicy:
    # Counted from the first failure of the current run of failures.
    budget_seconds: float
    initial_backoff_seconds: float
    max_backoff_seconds: float
    # An upper bound besides the budget, for work that fails fast and forever after some progress.
    max_attempts: int

    def backoff(self, failures: int) -> float:
        """The wait after the `failures`-th failure in a row: initial, doubling, at most the maximum."""
        doublings = min(max(failures - 1, 0), _MAX_DOUBLINGS)
        return min(self.max_backoff_seconds, self.initial_backoff_seconds * 2.0**doublings)

    def retry_at(self, failing_since: float, failures: int, attempts: int, now: float) -> float | None:
        """When to try again, or None once the budget or the attempts are spent.

        The last try is never scheduled past the budget's end, so an outage as long as the budget still
        gets one try after it.
        """
        budget_end = failing_since + self.budget_seconds
        if attempts >= self.max_attempts or now >= budget_end:
            return None
        return min(now + self.backoff(failures), budget_end)

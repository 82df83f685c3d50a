from __future__ import annotations

from services.gateway.retry_policy import RetryPolicy

POLICY = RetryPolicy(budget_seconds=60.0, initial_backoff_seconds=0.5, max_backoff_seconds=8.0, max_attempts=10)


def test_backoff_doubles_from_the_initial_wait_up_to_the_maximum() -> None:
    assert [POLICY.backoff(failures) for failures in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert POLICY.backoff(10_000) == 8.0


def test_a_retry_is_due_after_the_backoff_but_never_past_the_budget() -> None:
    assert POLICY.retry_at(failing_since=100.0, failures=3, attempts=3, now=110.0) == 112.0
    # 4 s of backoff would end past the budget (160 s): the last try comes at its end.
    assert POLICY.retry_at(failing_since=100.0, failures=5, attempts=5, now=157.0) == 160.0


def test_no_retry_once_the_budget_or_the_attempts_are_spent() -> None:
    assert POLICY.retry_at(failing_since=100.0, failures=2, attempts=2, now=160.0) is None
    assert POLICY.retry_at(failing_since=100.0, failures=2, attempts=10, now=101.0) is None
    assert POLICY.retry_at(failing_since=100.0, failures=2, attempts=9, now=101.0) == 102.0

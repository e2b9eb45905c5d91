"""The one backoff rule that Terraform, the tracking logger and the reconciler share."""

from __future__ import annotations

import pytest

from platform.provision import RetryPolicy
from platform.retry import Backoff


def test_waits_double_up_to_the_cap_and_a_success_starts_over():
    backoff = Backoff(first_s=1.0, max_s=5.0, jitter=0.0)
    assert [backoff.failed() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff.peek() == 5.0 and backoff.failures == 5      # peeking counts nothing
    backoff.reset()
    assert backoff.peek() == 1.0 and backoff.failed() == 1.0


def test_jitter_only_shortens_a_wait_and_spreads_it():
    backoff = Backoff(first_s=8.0, max_s=8.0)
    waits = [backoff.delay(1) for _ in range(2000)]
    assert all(4.0 <= w <= 8.0 for w in waits)                  # cut by up to half, never longer
    assert max(waits) - min(waits) > 3.0


@pytest.mark.parametrize("attempt, ceiling", [(1, 10.0), (2, 20.0), (4, 80.0), (6, 120.0)])
def test_terraform_retry_policy_uses_it(attempt, ceiling):
    delay = RetryPolicy().delay(attempt)
    assert ceiling / 2 <= delay <= ceiling

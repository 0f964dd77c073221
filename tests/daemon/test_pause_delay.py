"""How long a paused job waits before it is relaunched: doubling while its checkpoints keep failing."""

from __future__ import annotations

from cetd.daemon.job_supervisor import PAUSE_RETRY, PAUSE_RETRY_MAX, pause_delay


def test_the_first_failure_waits_the_short_retry() -> None:
    assert pause_delay(1) == PAUSE_RETRY.total_seconds() == 3.0
    assert pause_delay(0) == 3.0


def test_failures_in_a_row_double_the_wait_up_to_the_cap() -> None:
    delays = [pause_delay(n) for n in range(1, 10)]
    assert delays[:5] == [3.0, 6.0, 12.0, 24.0, 48.0]
    assert delays[5:] == [PAUSE_RETRY_MAX.total_seconds()] * 4 == [60.0] * 4
    assert pause_delay(10_000) == 60.0

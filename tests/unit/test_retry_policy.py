"""The retry policy's rules: which answers are retried, which count against the budget."""

from __future__ import annotations

import random
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractIncomingMessage

from worker.amqp.consumer import to_delivery
from worker.amqp.topology import DELAY_BUCKETS, delay_bucket
from worker.core.errors import (
    GraphAmbiguous,
    GraphNoAnswer,
    GraphRefused,
    GraphUnreachable,
    TokenUnavailable,
)
from worker.core.invite import interpret
from worker.core.retry import RetryPolicy

POLICY = RetryPolicy(max_attempts=5, max_elapsed=120.0, base_delay=0.5, max_delay=30.0)


@pytest.mark.parametrize("status", [500, 502, 504])
def test_500_502_and_504_are_ambiguous_and_final_unless_retry_ambiguous(status: int) -> None:
    with pytest.raises(GraphAmbiguous) as raised:
        interpret(status, {}, b"")
    assert raised.value.reason == "graph_ambiguous"
    assert POLICY.delay_before_next(raised.value, attempts=1, elapsed=0) is None
    retrying = RetryPolicy(retry_ambiguous=True)
    assert retrying.delay_before_next(raised.value, attempts=1, elapsed=0) is not None


@pytest.mark.parametrize("status", [429, 503])
def test_answers_that_say_graph_did_nothing_do_not_use_up_the_attempt_budget(status: int) -> None:
    with pytest.raises(GraphRefused) as raised:
        interpret(status, {"retry-after": "1.5"}, b"")
    assert not isinstance(raised.value, GraphAmbiguous)
    # Twenty throttled attempts: still retried, after Graph's Retry-After.
    assert POLICY.delay_before_next(raised.value, attempts=20, throttled=20, elapsed=0) == 1.5
    # Only the elapsed budget ends them.
    assert POLICY.delay_before_next(raised.value, attempts=20, throttled=20, elapsed=119) is None


def test_attempts_that_could_have_had_an_effect_are_counted() -> None:
    ambiguous = RetryPolicy(max_attempts=5, retry_ambiguous=True)
    for error in (GraphUnreachable("refused"), GraphNoAnswer("reset")):
        # Nine attempts of which five were throttled: four counted, one more allowed.
        assert ambiguous.delay_before_next(error, attempts=9, throttled=5, elapsed=0) is not None
        assert ambiguous.delay_before_next(error, attempts=10, throttled=5, elapsed=0) is None


def test_transient_token_failures_have_their_own_budget_and_a_growing_backoff() -> None:
    outage = TokenUnavailable("temporarily_unavailable", "AADSTS90033", transient=True)
    rng = random.Random(7)  # noqa: S311 - jitter, not secrets
    delays = [
        POLICY.delay_before_next(outage, attempts=0, token_failures=n, elapsed=0, rng=rng)
        for n in range(1, 6)
    ]
    assert delays[-1] is None
    # Not backoff(0) every time: the wait grows with the failures (backoff(n) is between half
    # and all of 0.5 s x 2^(n-1)).
    for failures, delay in enumerate(delays[:4], 1):
        assert delay is not None
        assert delay >= 0.25 * 2 ** (failures - 1)
    with_retry_after = TokenUnavailable("x", "y", transient=True, retry_after=3.0)
    assert POLICY.delay_before_next(with_retry_after, attempts=0, token_failures=1, elapsed=0) == 3
    refused = TokenUnavailable("unauthorized_client", "consent was revoked")
    assert POLICY.delay_before_next(refused, attempts=0, token_failures=1, elapsed=0) is None


@pytest.mark.parametrize(
    ("wait", "bucket"), [(0.3, 1), (1.5, 1), (2.0, 2), (4.9, 2), (61, 60), (119, 60), (4000, 3600)]
)
def test_a_delayed_retry_waits_in_a_queue_never_longer_than_its_wait(
    wait: float, bucket: int
) -> None:
    assert delay_bucket(wait) == bucket
    assert bucket in DELAY_BUCKETS


def _message(headers: dict[str, Any]) -> AbstractIncomingMessage:
    return cast(
        AbstractIncomingMessage,
        SimpleNamespace(
            body=b"{}", content_type="application/json", message_id="m", headers=headers
        ),
    )


def test_the_retry_headers_are_read_and_bounded() -> None:
    now_ms = round(time.time() * 1000)
    delivery = to_delivery(
        _message(
            {
                "x-invite-attempts": 7,
                "x-invite-throttled-attempts": 6,
                "x-invite-token-failures": 2,
                "x-invite-retry-at-ms": now_ms + 1500,
                "x-invite-last-status": 429,
                "x-invite-last-error": "GraphRefused",
            }
        )
    )
    assert (delivery.prior_attempts, delivery.prior_throttled, delivery.prior_token_failures) == (
        7,
        6,
        2,
    )
    assert delivery.retry_at == (now_ms + 1500) / 1000
    assert (delivery.last_status, delivery.last_error) == (429, "GraphRefused")
    hostile = to_delivery(
        _message(
            {
                "x-invite-retry-at-ms": now_ms + 10 * 86_400_000,
                "x-invite-last-status": "429",
                "x-invite-last-error": "SystemExit",
                "x-invite-throttled-attempts": True,
            }
        )
    )
    assert (hostile.retry_at, hostile.last_status, hostile.last_error) == (None, None, None)
    assert hostile.prior_throttled == 0

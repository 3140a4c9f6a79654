"""Publishing with publisher confirms: outcome events, delayed retries, dead-letter copies.

Every publish waits for the broker's confirmation and says whether it came: a command's
message is settled only once what it needed published is confirmed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage
from aio_pika.exceptions import AMQPError

from worker.amqp.bodies import DroppedBody
from worker.amqp.topology import delay_bucket
from worker.core.handler import Handled
from worker.core.outcomes import OutcomeEvent
from worker.observability.metrics import Metrics
from worker.settings import Settings

log = structlog.get_logger("worker.amqp.publishing")

OUTCOME_CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
#: Seconds before a command whose outcome the broker refused goes back to the queue, so
#: that a broker that keeps refusing is not hammered.
REQUEUE_DELAY = 1.0
PUBLISH_TIMEOUT = 10.0
#: Headers the worker sets on retried and dead-lettered copies of a command.
ATTEMPTS_HEADER = "x-invite-attempts"
#: Of those attempts, the ones Graph refused without acting (429, 503, 509).
THROTTLED_HEADER = "x-invite-throttled-attempts"
#: Failed token requests for the command.
TOKEN_FAILURES_HEADER = "x-invite-token-failures"  # noqa: S105 - a header name
#: Epoch milliseconds, an integer: AMQP header floats are 32-bit and would lose a minute.
FIRST_RECEIVED_HEADER = "x-invite-first-received-ms"
#: Epoch milliseconds before which the next attempt must not start (Retry-After, backoff).
RETRY_AT_HEADER = "x-invite-retry-at-ms"
LAST_STATUS_HEADER = "x-invite-last-status"
LAST_ERROR_HEADER = "x-invite-last-error"
#: Handler crashes so far: a crashed command comes back as a copy carrying this count, so
#: that crashes are bounded without the broker's x-delivery-count (which RabbitMQ 4.3 no
#: longer raises on a requeue).
CRASHES_HEADER = "x-invite-crashes"
#: On an outcome whose correlation_id is not the commandId: "message_id" or "none".
CORRELATION_FALLBACK_HEADER = "x-invite-correlation-id-fallback"
#: An AMQP short string (message_id, correlation_id, type, ...): at most 255 bytes of UTF-8.
SHORTSTR_BYTES = 255
_BROKER_HEADERS = frozenset(
    {
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)


def fits_shortstr(value: str | None) -> bool:
    """Whether `value` can be an AMQP short-string property (255 bytes of UTF-8 at most).

    Untrusted strings (a JSON commandId) may be too long, or hold a lone surrogate that no
    UTF-8 encoder accepts: either makes the AMQP library raise while publishing.
    """
    if value is None:
        return False
    if len(value) > SHORTSTR_BYTES:
        return False
    try:
        return len(value.encode("utf-8")) <= SHORTSTR_BYTES
    except UnicodeEncodeError:
        return False


def fitted_correlation_id(
    command_id: str | None, message_id: str | None
) -> tuple[str | None, str | None]:
    """(correlation_id, fallback): the commandId when it fits, else the message_id, else none.

    `fallback` is None when the commandId is used (or there was none to use), "message_id"
    or "none" when a commandId was there and did not fit.
    """
    if command_id is not None and fits_shortstr(command_id):
        return command_id, None
    fallback = message_id if fits_shortstr(message_id) else None
    if command_id is None:
        return fallback, None
    return fallback, "message_id" if fallback is not None else "none"


class Publisher:
    """Publishes on the confirming channel to the outcome, delay and dead-letter exchanges."""

    def __init__(
        self,
        settings: Settings,
        channel: AbstractChannel,
        outcomes: AbstractExchange,
        dead_letters: AbstractExchange,
        *,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._channel: AbstractChannel | None = channel
        self._outcomes: AbstractExchange | None = outcomes
        self._dead_letters: AbstractExchange | None = dead_letters
        self._metrics = metrics
        self._served = settings.served_tenants

    async def publish(
        self, exchange: AbstractExchange | None, message: aio_pika.Message, routing_key: str
    ) -> bool:
        """Publish and wait for the broker's confirmation; False when it did not confirm."""
        if exchange is None:
            return False
        try:
            await exchange.publish(message, routing_key=routing_key, timeout=PUBLISH_TIMEOUT)
        except (TimeoutError, AMQPError, ConnectionError, RuntimeError) as exc:
            self._metrics.outcome_publish_failures.inc()
            log.warning("publish.not_confirmed", routing_key=routing_key, error=type(exc).__name__)
            return False
        return True

    async def publish_event(
        self,
        event: OutcomeEvent,
        correlation: str | None,
        *,
        fallback: str | None = None,
        trace: Mapping[str, str] | None = None,
    ) -> bool:
        """Publish an outcome; `correlation` must fit a short string (`fitted_correlation_id`).

        `fallback` says, in a header, that the correlation_id is not the commandId; `trace`
        holds the `traceparent` (and `tracestate`) headers that carry the trace on.
        """
        headers: dict[str, Any] = dict(trace) if trace else {}
        if fallback:
            headers[CORRELATION_FALLBACK_HEADER] = fallback
        message = aio_pika.Message(
            event.to_json(),
            content_type=OUTCOME_CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=event.id,
            correlation_id=correlation,
            type=event.type.value,
            timestamp=event.time,
            app_id="invite-worker",
            headers=headers or None,
        )
        confirmed = await self.publish(self._outcomes, message, event.type.value)
        if confirmed:
            tenant = event.data.tenant_id
            label = tenant if tenant in self._served else "other"
            self._metrics.outcomes.inc(event.type.value, label)
        return confirmed

    def copy(
        self,
        message: AbstractIncomingMessage,
        extra: dict[str, Any],
        replace: Mapping[str, str | None] | None = None,
    ) -> aio_pika.Message:
        """The message with the worker's `extra` headers; `replace` sets or (None) drops some."""
        headers = {k: v for k, v in (message.headers or {}).items() if k not in _BROKER_HEADERS}
        headers.update({k: v for k, v in extra.items() if v is not None})
        for key, value in (replace or {}).items():
            if value is None:
                headers.pop(key, None)
            else:
                headers[key] = value
        return aio_pika.Message(
            message.body,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )

    async def publish_retry(
        self,
        message: AbstractIncomingMessage,
        handled: Handled,
        trace: Mapping[str, str | None] | None = None,
    ) -> bool:
        """A copy to the delay queue; `trace` sets (or drops) its trace context headers."""
        assert handled.retry_in is not None  # noqa: S101 - called only for retries
        # The longest delay queue not longer than the wait: the copy never comes back late,
        # and the handler waits out what is left of `retry_at` when it comes back early.
        bucket = delay_bucket(handled.retry_in)
        copy = self.copy(
            message,
            {
                ATTEMPTS_HEADER: handled.attempts,
                THROTTLED_HEADER: handled.throttled,
                TOKEN_FAILURES_HEADER: handled.token_failures,
                FIRST_RECEIVED_HEADER: round(handled.first_received * 1000),
                RETRY_AT_HEADER: None
                if handled.retry_at is None
                else round(handled.retry_at * 1000),
                LAST_STATUS_HEADER: handled.http_status,
                LAST_ERROR_HEADER: handled.error_type,
                CRASHES_HEADER: handled.crashes or None,
            },
            trace,
        )
        channel = self._channel
        if channel is None:
            return False
        return await self.publish(
            channel.default_exchange, copy, self._settings.delay_queue(bucket)
        )

    async def dead_letter(self, message: AbstractIncomingMessage, handled: Handled | None) -> None:
        """Keep the command in the dead-letter queue with headers that say why.

        A body over MAX_COMMAND_BYTES and over 4 MiB was dropped as it arrived
        (`worker.amqp.bodies`): it goes through the broker's own dead-lettering (`x-death`
        says `rejected`; its outcome event says why), the broker holding it whole.
        """
        if isinstance(message.body, DroppedBody):
            await message.nack(requeue=False)
            self._metrics.dead_lettered.inc("too_large")
            return
        extra: dict[str, Any] = {"x-invite-fault-reason": "unknown"}
        if handled is not None:
            problems = getattr(handled.event.data, "problems", None) if handled.event else None
            extra = {
                "x-invite-fault-reason": "redelivered_too_often" if handled.poison else "rejected",
                "x-invite-error-type": handled.error_type,
                ATTEMPTS_HEADER: handled.attempts,
                LAST_STATUS_HEADER: handled.http_status,
                "x-invite-request-id": handled.request_id,
                "x-invite-outcome-id": handled.event.id if handled.event else None,
                CRASHES_HEADER: handled.crashes or None,
                "x-invite-problems": json.dumps([f"{p.field}: {p.problem}" for p in problems])[
                    :2000
                ]
                if problems
                else None,
            }
        if await self.publish(self._dead_letters, self.copy(message, extra), ""):
            self._metrics.dead_lettered.inc(str(extra["x-invite-fault-reason"]))
            await message.ack()
        else:
            # The broker's own dead-lettering, without the headers, rather than nothing.
            await message.nack(requeue=False)

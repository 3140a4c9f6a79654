"""The decisions, with no I/O: what a command is, what Graph's answer means, what happens next.

Nothing here imports aio-pika, httpx, aiohttp, MSAL or Redis, nor any part of the package but
`worker.observability`; the edges (`worker.amqp`, `worker.graph`) translate to and from it
through the ports in `worker.core.ports`. `tests/unit/test_layering.py` keeps it so.
"""

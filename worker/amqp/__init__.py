"""The RabbitMQ edge: everything that speaks aio-pika.

Topology, the consumer that turns deliveries into the core's `Delivery` values, the publishing
of outcome events and of delay and dead-letter copies, and the settlement of every message.
"""

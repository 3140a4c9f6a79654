"""What an operator sees: structured logs, Prometheus metrics, and the health endpoints."""

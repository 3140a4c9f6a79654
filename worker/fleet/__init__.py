"""The fleet edge: state shared by every worker process, in Redis (optional: REDIS_URL)."""

from worker.fleet.pipelining import AutoPipeline, packing_connection
from worker.fleet.state import RedisSharedState

__all__ = ["AutoPipeline", "RedisSharedState", "packing_connection"]

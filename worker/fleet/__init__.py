"""The fleet edge: state shared by every worker process, in Redis (optional: REDIS_URL)."""

from worker.fleet.state import RedisSharedState

__all__ = ["RedisSharedState"]

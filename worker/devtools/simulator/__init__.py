"""Graph simulator: a local HTTPS stand-in for Entra ID and the Graph call-invite endpoint,
for the tests, the demo, the benchmarks and ``invite-worker simulator``."""

from worker.devtools.simulator.entra import GRAPH_SCOPE, JWT_BEARER, RecordedTokenRequest
from worker.devtools.simulator.faults import FaultRule
from worker.devtools.simulator.graph import MAX_CLIENT_CONTEXT, RecordedInvite
from worker.devtools.simulator.server import (
    ReadyCallback,
    Simulator,
    SimulatorOptions,
    run_forever,
    run_from_args,
    serve,
)
from worker.devtools.simulator.thread import SimulatorThread

__all__ = [
    "GRAPH_SCOPE",
    "JWT_BEARER",
    "MAX_CLIENT_CONTEXT",
    "FaultRule",
    "ReadyCallback",
    "RecordedInvite",
    "RecordedTokenRequest",
    "Simulator",
    "SimulatorOptions",
    "SimulatorThread",
    "run_forever",
    "run_from_args",
    "serve",
]

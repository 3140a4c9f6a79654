"""The invite worker's benchmark: `make bench`, or `python -m benchmarks.run --help`.

Runs the real worker process and a floor program (`benchmarks.floor`: the same I/O per command
and nothing else) against the local RabbitMQ and the HTTPS Graph simulator, each in a process
of its own, and reports throughput, CPU, latency, memory and start-up time. Not part of the
test run.
"""

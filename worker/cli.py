"""The `invite-worker` command line: run the worker, the simulator, the demo, send, schemas."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from worker import __version__


def _run(_args: argparse.Namespace) -> int:
    # Every subcommand imports its implementation here, when it runs: `run` and `healthcheck`
    # load nothing of the developer tooling, and `--version` loads almost nothing.
    from worker import app  # noqa: PLC0415
    from worker.observability import logs  # noqa: PLC0415
    from worker.settings import Settings  # noqa: PLC0415

    try:
        settings = Settings()
    except ValidationError as exc:
        # Settings errors name the variable; their input is not echoed (it may be a secret).
        for error in exc.errors(include_input=False, include_url=False):
            where = ".".join(str(p) for p in error["loc"]) or "settings"
            print(f"invalid setting {where}: {error['msg']}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format, service=settings.otel_service_name)
    with asyncio.Runner(loop_factory=event_loop_factory(settings.event_loop)) as runner:
        return runner.run(app.run(settings))


def event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of the `EVENT_LOOP` chosen: uvloop's, or None for asyncio's own."""
    if name == "uvloop":
        import uvloop  # noqa: PLC0415 - only the commands that run the worker need it

        return uvloop.new_event_loop
    return None


def _healthcheck(_args: argparse.Namespace) -> int:
    from worker.observability.health import probe  # noqa: PLC0415
    from worker.settings import Settings  # noqa: PLC0415

    return 0 if probe(Settings().health_port) else 1


def _simulator(args: argparse.Namespace) -> int:
    from worker.devtools import simulator  # noqa: PLC0415

    return asyncio.run(simulator.run_from_args(args))


def _demo(args: argparse.Namespace) -> int:
    from worker.devtools import demo  # noqa: PLC0415

    return demo.main(
        amqp_url=args.amqp_url,
        examples=args.examples,
        worker_log=args.worker_log,
        verbose=args.verbose,
    )


def _dead_letters(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415

    from worker.ops import deadletters  # noqa: PLC0415
    from worker.settings import Settings  # noqa: PLC0415

    settings = Settings()
    if args.action == "list":
        for letter in asyncio.run(deadletters.list_dead_letters(settings)):
            print(json.dumps(letter.summary(), default=str))
        return 0
    if not args.all and not args.command_id:
        print("replay needs --all or --command-id", file=sys.stderr)
        return 2
    wanted = None if args.all else set(args.command_id)
    replayed = asyncio.run(deadletters.replay(settings, wanted))
    for letter in replayed:
        print(json.dumps({"replayed": letter.command_id, "messageId": letter.message_id}))
    print(f"{len(replayed)} command(s) moved to {settings.command_queue}", file=sys.stderr)
    return 0


def _schemas(args: argparse.Namespace) -> int:
    from worker.ops import schemas  # noqa: PLC0415

    if args.check:
        drifted = schemas.drifted(args.directory)
        for name in drifted:
            print(f"{args.directory / name} differs from the models", file=sys.stderr)
        return 1 if drifted else 0
    for path in schemas.write(args.directory):
        print(path)
    return 0


def _send(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415

    from worker.ops import send  # noqa: PLC0415
    from worker.settings import Settings  # noqa: PLC0415

    flags = args.call_id or args.user or args.phone or args.tenant or args.replaces_call_id
    if (args.file is None) == (not flags):
        print("send needs a FILE (or - for standard input), or --call-id and", file=sys.stderr)
        print("--user/--phone, not both", file=sys.stderr)
        return 2
    if args.file is None:
        if not args.call_id:
            print("--call-id is required to build a command from flags", file=sys.stderr)
            return 2
        command = send.build_command(
            call_id=args.call_id,
            users=args.user,
            phones=args.phone,
            tenant_id=args.tenant,
            replaces_call_id=args.replaces_call_id,
        )
        body = json.dumps(command).encode()
    elif args.file == "-":
        body = sys.stdin.buffer.read()
    else:
        try:
            body = Path(args.file).read_bytes()
        except OSError as exc:
            print(f"cannot read {args.file}: {exc.strerror}", file=sys.stderr)
            return 2
    try:
        settings = Settings()
    except ValidationError as exc:
        _print_settings_errors(exc)
        return 2
    return send.run(settings, body, timeout=args.timeout, as_json=args.json)


def _print_settings_errors(exc: ValidationError) -> None:
    # Settings errors name the variable; their input is not echoed (it may be a secret).
    for error in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in error["loc"]) or "settings"
        print(f"invalid setting {where}: {error['msg']}", file=sys.stderr)


def _simulator_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `invite-worker simulator`, declared here so that parsing imports no devtools."""
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    add("--port", type=int, default=8443, help="port to bind (default: %(default)s)")
    add("--directory", type=Path, default=Path(".simulator"), help="where the CA goes")
    add("--latency", type=float, default=0.0, help="seconds added to every invite answer")
    add("--token-lifetime", type=int, default=3600, help="token lifetime in seconds")
    add("--client-secret", default=None, help="the only client secret accepted (default: any)")
    add("--revoked-tenant", action="append", default=[], help="tenant whose consent is revoked")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="invite-worker",
        description="Invite participants to Microsoft Teams calls from RabbitMQ commands.",
    )
    parser.add_argument("--version", action="version", version=f"invite-worker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the worker (configured by environment variables)")
    run.set_defaults(handler=_run)

    health = commands.add_parser(
        "healthcheck", help="exit 0 if the local worker's /healthz answers 200 (HEALTH_PORT)"
    )
    health.set_defaults(handler=_healthcheck)

    sim = commands.add_parser("simulator", help="run the local HTTPS Graph and Entra ID simulator")
    _simulator_arguments(sim)
    sim.set_defaults(handler=_simulator)

    demo = commands.add_parser(
        "demo", help="run the simulator and a worker, publish the example commands, print outcomes"
    )
    demo.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    demo.add_argument("--examples", type=Path, default=Path("schemas/examples"))
    demo.add_argument("--worker-log", type=Path, help="keep the worker's log lines in this file")
    demo.add_argument(
        "--verbose", action="store_true", help="print each outcome event and the worker's log lines"
    )
    demo.set_defaults(handler=_demo)

    dead = commands.add_parser(
        "dead-letters", help="list the dead-letter queue, or replay commands from it"
    )
    dead.add_argument("action", choices=["list", "replay"])
    dead.add_argument("--all", action="store_true", help="replay every dead-lettered command")
    dead.add_argument(
        "--command-id", action="append", default=[], help="replay this command (repeatable)"
    )
    dead.set_defaults(handler=_dead_letters)

    sender = commands.add_parser(
        "send",
        help="publish one command (validated first) and wait for its outcome",
        description=(
            "Publish a command from FILE, from standard input (-), or built from flags, to "
            "COMMAND_QUEUE and wait for its outcome on OUTCOME_EXCHANGE. Exit 0 accepted, 1 "
            "failed/rejected/expired, 2 invalid (not published), 3 timeout, 4 not published."
        ),
    )
    sender.add_argument("file", nargs="?", help="the command as JSON; - for standard input")
    sender.add_argument("--call-id", help="the Graph call id")
    sender.add_argument("--user", action="append", default=[], help="invite this user id")
    sender.add_argument("--phone", action="append", default=[], help="invite this E.164 number")
    sender.add_argument("--tenant", help="the call's tenant (default: AZURE_TENANT_ID)")
    sender.add_argument("--replaces-call-id", help="the peer-to-peer call this one replaces")
    sender.add_argument("--timeout", type=float, default=30.0, help="seconds (default: 30)")
    sender.add_argument("--json", action="store_true", help="print the outcome event as JSON")
    sender.set_defaults(handler=_send)

    schema = commands.add_parser(
        "schemas", help="write (or --check) the JSON Schemas and asyncapi.yaml"
    )
    schema.add_argument("--directory", type=Path, default=Path("schemas"))
    schema.add_argument("--check", action="store_true", help="exit 1 if the files have drifted")
    schema.set_defaults(handler=_schemas)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.handler(args)
    return code

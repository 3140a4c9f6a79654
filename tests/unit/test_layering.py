"""The architecture holds: imports point one way, and production commands load no dev tooling.

`cli` → `app` → `amqp`, `graph`, `ops`, `devtools` → `core` → `observability`.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.support.harness import Broker, isolated_settings

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "worker"
#: Libraries that do I/O; the core decides without them.
EDGE_LIBRARIES = {"aio_pika", "aiormq", "pamqp", "httpx", "httpcore", "aiohttp", "msal", "redis"}
#: The core opens its spans (token, wait, Graph request) with OpenTelemetry's API, as it would
#: log with `logging`: the API does no I/O and is a no-op until the process installs an SDK,
#: which only `worker.observability.tracing.configure` does, at start-up. A port of the
#: project's own would only repeat the API's `Tracer`. The SDK and its exporters (threads,
#: HTTP) stay out of the core.
OTEL_SDK = ("opentelemetry.sdk", "opentelemetry.exporter")


def _imports(path: Path) -> set[str]:
    """Every module a file imports, lazily or not, as absolute dotted names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _modules(subpackage: str) -> list[Path]:
    return sorted((PACKAGE / subpackage).rglob("*.py"))


def _worker_imports(path: Path) -> set[str]:
    return {
        name
        for name in _imports(path)
        if name.startswith("worker.") and name != "worker.__version__"
    }


def test_the_core_imports_no_io_library_and_nothing_outside_core_but_observability() -> None:
    offenders = []
    for path in _modules("core"):
        for name in sorted(_imports(path)):
            top = name.split(".")[0]
            inside = name.startswith(("worker.core", "worker.observability"))
            if (
                top in EDGE_LIBRARIES
                or name.startswith(OTEL_SDK)
                or (top == "worker" and not inside)
            ):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []
    assert len(_modules("core")) >= 10  # the check reads the real package


def test_the_sdk_is_loaded_only_when_tracing_is_on() -> None:
    """Without an exporter the worker keeps the API's no-op tracer and loads no SDK."""
    off = _loaded_after(
        "from worker.settings import Settings\n"
        "from worker.observability import tracing\n"
        "import worker.core.handler, worker.amqp.consumer\n"
        "t = tracing.configure(enabled=Settings().tracing_enabled, service_name='s', "
        "version='v')\n"
        "assert not t.enabled",
        {},
    )
    assert not [m for m in off if m.startswith(OTEL_SDK)]
    on = _loaded_after(
        "from worker.settings import Settings\n"
        "from worker.observability import tracing\n"
        "s = Settings()\n"
        "t = tracing.configure(enabled=s.tracing_enabled, service_name='s', version='v', "
        "endpoint=s.otel_traces_url)\n"
        "assert t.enabled\n"
        "t.shutdown()",
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"},
    )
    assert "opentelemetry.sdk.trace" in on


def test_observability_imports_nothing_of_the_layers_above_it() -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _modules("observability")
        for name in sorted(_worker_imports(path))
        if not name.startswith("worker.observability")
    ]
    assert offenders == []


def test_only_the_command_line_reaches_the_app_and_the_developer_tooling() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for name in sorted(_worker_imports(path)):
            if name.startswith("worker.cli") and module != "worker.__main__":
                offenders.append(f"{module} imports {name}")
            if name.startswith("worker.app") and module != "worker.cli":
                offenders.append(f"{module} imports {name}")
            if name.startswith("worker.devtools") and not module.startswith(
                ("worker.devtools", "worker.cli")
            ):
                offenders.append(f"{module} imports {name}")
    assert offenders == []


def _loaded_after(code: str, env: dict[str, str]) -> list[str]:
    """Runs `code` in a fresh interpreter; the modules it had loaded by the end."""
    script = f"import json, sys\n{code}\nprint('MODULES=' + json.dumps(sorted(sys.modules)))\n"
    result = subprocess.run(  # noqa: S603 - a fixed interpreter and script
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("MODULES=")]
    assert lines, result.stderr[-2000:]
    modules: list[str] = json.loads(lines[-1].removeprefix("MODULES="))
    return modules


def _devtools(modules: list[str]) -> list[str]:
    return [m for m in modules if m.startswith("worker.devtools")]


@pytest.mark.integration
async def test_invite_worker_run_starts_consumes_and_stops_without_loading_devtools(
    rabbitmq: str, broker: Broker
) -> None:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    env = {
        "AMQP_URL": rabbitmq,
        "COMMAND_QUEUE": f"{prefix}.commands",
        "OUTCOME_EXCHANGE": f"{prefix}.outcomes",
        "AZURE_CLIENT_SECRET": "a-secret",
        "HEALTH_PORT": "0",
        "LOG_FORMAT": "json",
    }
    # The whole `run` path: settings, logging, start-up, consuming, then SIGTERM and a clean
    # stop; the worker's own log shows it got as far as ready.
    code = (
        "import os, signal, threading\n"
        "from worker.cli import main\n"
        "threading.Timer(4, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()\n"
        "code = main(['run'])\n"
        "assert code == 0, code"
    )
    broker.clean_up_after(isolated_settings(dict(env)))
    modules = _loaded_after(code, env)
    assert "worker.app" in modules
    assert "worker.amqp.consumer" in modules
    assert _devtools(modules) == []


def test_healthcheck_and_version_load_no_devtools() -> None:
    healthcheck = _loaded_after(
        "from worker.cli import main\nassert main(['healthcheck']) == 1",
        {"HEALTH_PORT": "1"},  # nothing listens there: the probe runs and fails
    )
    assert "worker.observability.health" in healthcheck
    assert _devtools(healthcheck) == []
    version = _loaded_after(
        "import contextlib\nfrom worker.cli import main\n"
        "with contextlib.suppress(SystemExit):\n    main(['--version'])",
        {},
    )
    assert "worker.cli" in version
    assert _devtools(version) == []
    assert "aio_pika" not in version

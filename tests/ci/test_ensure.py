""".ci/ensure: what `make test`, `make demo` and CI run to get uv, RabbitMQ and Redis.

Each path runs the real script with a PATH of a throwaway directory: the tools it needs linked
in, and small stand-ins for pip, apt-get and redis-server that record how they were called.
The machine's uv, broker and Redis are never touched: a Redis "already running" is a socket this
test listens on, and a started one is a stand-in's listener on a free port.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENSURE = ROOT / ".ci" / "ensure"
#: What the script runs, and what the stand-ins below use (chmod, touch, cp).
TOOLS = ("bash", "env", "id", "cut", "seq", "sleep", "dirname", "cat", "chmod", "touch", "cp")
UV_VERSION = next(
    line.split("=", 1)[1]
    for line in ENSURE.read_text().splitlines()
    if line.startswith("UV_VERSION=")
)


@dataclass
class Sandbox:
    bin: Path
    calls: Path

    def tool(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text(f'#!{shutil.which("bash")}\necho "{name} $*" >> {self.calls}\n{body}\n')
        path.chmod(path.stat().st_mode | stat.S_IXUSR)

    def fake_uv(self, version: str) -> None:
        self.tool("uv", f'echo "uv {version}"')

    def fake_pip_installing_uv(self, *, fails_first: bool = False) -> None:
        """python3 whose `-m pip install` puts a uv of the requested version on the PATH."""
        install = f"""
for arg in "$@"; do case "$arg" in uv==*) version="${{arg#uv==}}" ;; esac; done
if {"true" if fails_first else "false"} && [ ! -e {self.bin}/.failed ]; then
  touch {self.bin}/.failed; echo "error: externally-managed-environment" >&2; exit 1
fi
printf '#!{shutil.which("bash")}\\necho "uv %s"\\n' "$version" > {self.bin}/uv
chmod +x {self.bin}/uv"""
        self.tool("python3", install)

    def fake_redis_server(self, *, listens: bool) -> None:
        """redis-server that, daemonized, leaves a listener on --port for a few seconds."""
        listener = (
            f'port=""; while [ "$#" -gt 0 ]; do [ "$1" = --port ] && port="$2"; shift; done\n'
            f"{sys.executable} -c 'import socket, sys, time; s = socket.socket(); "
            f"s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
            f's.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(); time.sleep(5)\' '
            f'"$port" >/dev/null 2>&1 &\nsleep 0.2'
        )
        self.tool("redis-server", listener if listens else "true")

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603 - the project's own script
            [str(ENSURE), *args],
            env={"PATH": str(self.bin), "HOME": str(self.bin.parent), **env},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def recorded(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    bin_directory = tmp_path / "bin"
    bin_directory.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (bin_directory / tool).symlink_to(found)
    return Sandbox(bin_directory, tmp_path / "calls.log")


@pytest.fixture
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def listening(free_port: int) -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", free_port))
        server.listen()
        yield free_port


def test_the_sandbox_has_no_uv_redis_or_pip_of_the_machine(sandbox: Sandbox) -> None:
    for name in ("uv", "redis-server", "python3", "apt-get"):
        assert not (sandbox.bin / name).exists()
    assert "uv" not in os.listdir(sandbox.bin)


def test_a_missing_uv_is_installed_from_pypi_at_the_pinned_version(sandbox: Sandbox) -> None:
    sandbox.fake_pip_installing_uv()
    result = sandbox.run("uv")
    assert result.returncode == 0, result.stderr
    assert f"uv: not found; installing uv=={UV_VERSION} from PyPI" in result.stdout
    assert sandbox.recorded() == [
        f"python3 -m pip install --quiet --disable-pip-version-check uv=={UV_VERSION}"
    ]
    installed = subprocess.run(  # noqa: S603 - the stand-in written above
        [str(sandbox.bin / "uv"), "--version"], capture_output=True, text=True, check=True
    )
    assert installed.stdout.strip() == f"uv {UV_VERSION}"


def test_a_system_managed_python_gets_a_user_install(sandbox: Sandbox) -> None:
    sandbox.fake_pip_installing_uv(fails_first=True)
    result = sandbox.run("uv")
    assert result.returncode == 0, result.stderr
    assert "retrying as a user install" in result.stdout
    assert sandbox.recorded()[-1] == (
        "python3 -m pip install --quiet --disable-pip-version-check --user "
        f"--break-system-packages uv=={UV_VERSION}"
    )


def test_an_installed_uv_is_kept_and_ci_replaces_another_version(sandbox: Sandbox) -> None:
    sandbox.fake_pip_installing_uv()
    sandbox.fake_uv("0.1.0")
    laptop = sandbox.run("uv")
    assert laptop.returncode == 0, laptop.stderr
    assert laptop.stdout.startswith("uv: 0.1.0 at ")
    assert not any(call.startswith("python3") for call in sandbox.recorded())
    ci = sandbox.run("uv", CI="true")
    assert ci.returncode == 0, ci.stderr
    assert f"uv: 0.1.0 found, CI runs {UV_VERSION}" in ci.stdout
    assert sandbox.recorded()[-1].endswith(f"uv=={UV_VERSION}")
    pinned = sandbox.run("uv", CI="true")
    assert pinned.stdout.startswith(f"uv: {UV_VERSION} at ")


def test_a_redis_that_answers_is_left_alone(sandbox: Sandbox, listening: int) -> None:
    sandbox.fake_redis_server(listens=True)
    result = sandbox.run("redis", REDIS_PORT=str(listening))
    assert result.returncode == 0, result.stderr
    assert f"redis: already running on 127.0.0.1:{listening}" in result.stdout
    assert sandbox.recorded() == []


def test_an_installed_redis_that_does_not_answer_is_started_on_loopback(
    sandbox: Sandbox, free_port: int
) -> None:
    sandbox.fake_redis_server(listens=True)
    result = sandbox.run("redis", REDIS_PORT=str(free_port))
    assert result.returncode == 0, result.stderr
    assert "starting redis-server --daemonize yes" in result.stdout
    assert f"redis: ready on 127.0.0.1:{free_port}" in result.stdout
    assert sandbox.recorded() == [
        f"redis-server --daemonize yes --bind 127.0.0.1 --port {free_port} --save  --appendonly no"
    ]


def test_a_missing_redis_is_installed_from_debian_then_started(
    sandbox: Sandbox, free_port: int
) -> None:
    sandbox.tool("sudo", '"$@"')
    sandbox.tool(
        "apt-get",
        f'case "$1" in install) cp {sandbox.bin}/.redis-server {sandbox.bin}/redis-server ;; esac',
    )
    sandbox.fake_redis_server(listens=True)
    (sandbox.bin / "redis-server").rename(sandbox.bin / ".redis-server")
    result = sandbox.run("redis", REDIS_PORT=str(free_port))
    assert result.returncode == 0, result.stderr
    assert "redis: not installed; installing Debian's redis-server" in result.stdout
    calls = sandbox.recorded()
    assert calls[:2] == ["apt-get update -qq", "apt-get install -y -qq redis-server"]
    assert calls[-1].startswith("redis-server --daemonize yes")
    assert f"redis: ready on 127.0.0.1:{free_port}" in result.stdout


def test_a_redis_that_never_answers_fails_the_run(sandbox: Sandbox, free_port: int) -> None:
    sandbox.fake_redis_server(listens=False)
    result = sandbox.run("redis", REDIS_PORT=str(free_port), REDIS_WAIT="1")
    assert result.returncode == 1
    assert f"redis: did not answer on 127.0.0.1:{free_port} within 1 s" in result.stderr


def test_an_unknown_service_is_refused(sandbox: Sandbox) -> None:
    result = sandbox.run("postgres")
    assert result.returncode == 2
    assert "unknown: postgres" in result.stderr


def test_make_test_and_make_demo_make_sure_of_uv_and_the_services_first() -> None:
    """The Makefile's recipes call the script before the first `uv`, with pip's script dirs."""
    recipes = {}
    for target in ("test", "demo"):
        # A make of its own (not a sub-make of `make test`, which prints its directory).
        env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MAKELEVEL", "MFLAGS"}}
        dry = subprocess.run(  # noqa: S603 - make from the PATH, as a developer runs it
            ["make", "--no-print-directory", "-n", target],  # noqa: S607
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        recipes[target] = dry.stdout.splitlines()
    assert recipes["test"][0] == ".ci/ensure uv rabbitmq redis"
    assert recipes["test"][1] == ".ci/promtool"
    assert recipes["test"][2].startswith("uv run --frozen pytest")
    assert recipes["demo"][0] == ".ci/ensure uv rabbitmq"
    assert "uv" in (ROOT / ".ci" / "run").read_text().split(".ci/ensure ", 1)[1]
    bin_path = subprocess.run(  # noqa: S603 - the project's own script
        [str(ENSURE), "bin-path"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert all(Path(d).is_absolute() for d in bin_path.split(":"))

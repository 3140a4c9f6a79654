"""The README's main command: the real worker process, end to end, and what it logs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from worker.devtools import demo

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


@pytest.mark.timeout(180)
def test_demo_runs_the_examples_through_the_worker_process_and_exits_0(
    rabbitmq: str, tmp_path: Path
) -> None:
    log_path = tmp_path / "worker.log"
    result = subprocess.run(  # noqa: S603 - our own interpreter and module
        [
            sys.executable,
            "-m",
            "worker",
            "demo",
            "--amqp-url",
            rabbitmq,
            "--worker-log",
            str(log_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("outcome invite.accepted") == 5
    assert result.stdout.count("outcome invite.rejected") == 1
    assert "exited 0 after SIGTERM" in result.stdout
    # Without --verbose: no events whole, no log lines; the table closes the output.
    assert '"specversion"' not in result.stdout
    assert "command.settled" not in result.stdout
    table = result.stdout.rstrip().splitlines()[-8:]
    assert table[0].split() == [
        "example",
        "command",
        "id",
        "outcome",
        "attempts",
        "ms",
        "Graph",
        "received",
    ]
    assert set(table[1]) == {"-", " "}
    rows = {line.split()[0]: line.split() for line in table[2:]}
    for path in sorted((ROOT / "schemas" / "examples").glob("*.json")):
        row = rows[path.stem]
        assert row[1] == json.loads(path.read_text())["commandId"]
        assert row[2:4] == ["invite.accepted", "1"]
        assert float(row[4]) > 0
        assert row[5:7] == ["HTTP", "200:"]
    rejected = rows["rejected/example-2-as-written"]
    assert rejected[2:4] == ["invite.rejected", "0"]
    assert " ".join(rejected[5:]) == "nothing (no request)"
    # The PSTN example's number is shortened to its last digits.
    assert " ".join(rows["example-4-invite-pstn-participant"][5:]).endswith("phone …8901")
    assert "+12345678901" not in result.stdout

    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    settled = [line for line in lines if line["event"] == "command.settled"]
    assert len(settled) == 6
    for line in settled:
        for field in (
            "command_id",
            "call_id",
            "tenant_id",
            "outcome",
            "http_status",
            "request_id",
            "attempts",
            "duration_ms",
        ):
            assert field in line
    accepted = [line for line in settled if line["outcome"] == "invite.accepted"]
    assert {line["http_status"] for line in accepted} == {200}
    assert all(line["request_id"] for line in accepted)

    text = log_path.read_text()
    assert "+12345678901" not in text
    assert "demo-client-secret" not in text
    assert "Bearer" not in text
    assert "guest:guest" not in text


def test_version_is_printed_by_the_console_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("invite-worker ")


def test_run_refuses_invalid_settings_naming_the_variable_but_not_its_value() -> None:
    env = {"PATH": "/usr/bin:/bin", "GRAPH_BASE_URL": "http://graph.example/v1.0"}
    result = subprocess.run(
        [sys.executable, "-m", "worker", "run"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 2
    assert "GRAPH_BASE_URL" in result.stderr
    assert "graph.example" not in result.stderr


def test_sigterm_while_waiting_for_an_unreachable_broker_exits_0(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "AMQP_URL": "amqp://guest:guest@127.0.0.1:9/",
        "AZURE_CLIENT_SECRET": "not-used",
        "HEALTH_PORT": "0",
        "LOG_FORMAT": "json",
    }
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=log_file,
        )
        try:
            for _ in range(100):
                if '"broker.unreachable"' in log_path.read_text():
                    break
                time.sleep(0.05)
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=15) == 0
        finally:
            worker.kill()
    events = [json.loads(line)["event"] for line in log_path.read_text().splitlines()]
    assert "broker.unreachable" in events
    assert events[-1] == "worker.stopped"


def test_run_without_a_credential_exits_2_and_says_which_variables() -> None:
    env = {"PATH": "/usr/bin:/bin", "HEALTH_PORT": "0", "LOG_FORMAT": "json"}
    result = subprocess.run(
        [sys.executable, "-m", "worker", "run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 2
    assert "AZURE_CLIENT_SECRET" in result.stdout


@pytest.mark.timeout(180)
def test_demo_verbose_prints_each_event_whole_and_the_worker_log_lines(rabbitmq: str) -> None:
    result = subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "worker", "demo", "--amqp-url", rabbitmq, "--verbose"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count('"specversion": "1.0"') == 6
    assert result.stdout.count('"command.settled"') == 6
    assert "Graph received" in result.stdout


def test_the_summary_table_says_when_an_outcome_was_not_the_expected_one() -> None:
    rows = [
        demo.Row("a", "id-a", "invite.accepted", "invite.failed", 2, 12.34),
        demo.Row("b", "id-b", "invite.accepted"),
    ]
    table = demo.summary_table(rows, []).splitlines()
    assert "invite.failed (expected invite.accepted)" in table[2]
    assert table[2].split()[-5:] == ["2", "12.3", "nothing", "(no", "request)"]
    assert "none (expected invite.accepted)" in table[3]

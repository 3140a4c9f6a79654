"""The container image and the Kubernetes manifests, checked without a Docker engine or a cluster.

- The Dockerfile's install step (its `build` stage: same lock file, same uv, same commands) is
  replayed into a fresh directory, and the result runs `invite-worker --version` as the image's
  non-root user.
- The build context that .dockerignore lets through holds the app and nothing else.
- Every manifest under k8s/ loads; the base and every overlay render (a small implementation of
  the kustomize fields they use); the built-in kinds validate strictly against the schemas of a
  pinned Kubernetes version (kubernetes-validate), KEDA's, the RabbitMQ Messaging Topology
  Operator's and the Prometheus Operator's kinds against k8s/schemas/.
- The topology-operator overlay provisions exactly the queues, exchanges and bindings the worker
  declares, with its arguments, and runs it with DECLARE_TOPOLOGY=false.
- The values that several files must agree on (UID, ports, queue name, grace periods, Graph's
  rate limit against the replica ceiling) do.

hadolint, yamllint and checkov run beside this file in `make deploy-check`.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tests.support.harness import isolated_settings
from worker import __version__
from worker.amqp.topology import topology_objects
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
BASE = K8S / "base"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
SECRET_TEMPLATE = BASE / "secret.template.yaml"

#: The Kubernetes release the manifests must be valid for: the oldest one still supported
#: upstream when they were written. Raising it is a decision, not drift.
KUBERNETES_VERSION = "1.30.0"
#: Graph's throttling limit for invites: 50,000 requests per 15 s per app per tenant.
GRAPH_REQUESTS_PER_SECOND_PER_TENANT = 50_000 / 15
#: The kinds k8s/schemas/ describes; every other kind is a built-in one.
KEDA_SCHEMAS = {
    ("keda.sh/v1alpha1", kind): K8S / "schemas" / f"keda.sh-v1alpha1-{kind.lower()}.json"
    for kind in ("ScaledObject", "TriggerAuthentication")
}
#: The Prometheus Operator's kinds that k8s/schemas/ describes (from its CRDs).
MONITORING_SCHEMAS = {
    ("monitoring.coreos.com/v1", kind): K8S
    / "schemas"
    / f"monitoring.coreos.com-v1-{kind.lower()}.json"
    for kind in ("PodMonitor", "PrometheusRule")
}
#: The Messaging Topology Operator's kinds that k8s/schemas/ describes.
TOPOLOGY_KINDS = ("Queue", "Exchange", "Binding", "Policy")
TOPOLOGY_SCHEMAS = {
    ("rabbitmq.com/v1beta1", kind): K8S / "schemas" / f"rabbitmq.com-v1beta1-{kind.lower()}.json"
    for kind in TOPOLOGY_KINDS
}
CRD_SCHEMAS = {**KEDA_SCHEMAS, **TOPOLOGY_SCHEMAS, **MONITORING_SCHEMAS}
TOPOLOGY_OVERLAY = K8S / "overlays" / "topology-operator"
#: Settings that are credentials: only ever in the Secret, never in the ConfigMap.
CREDENTIALS = {"AMQP_URL", "AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PASSWORD", "REDIS_URL"}

Manifest = dict[str, Any]


# --- YAML -----------------------------------------------------------------------------------


def load_documents(path: Path) -> list[Manifest]:
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for doc in documents:
        assert isinstance(doc, dict), f"{path}: a document that is not a mapping"
    return documents


# --- A kustomize subset ---------------------------------------------------------------------
# kustomize is a Go program, which the lock file cannot install. The manifests use only the
# fields below, and this renderer refuses any other, so that what it renders is what `kubectl
# kustomize` would: kustomize applies patches, then the namespace (every kind here is
# namespaced), then images, as here.

_KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
_PATCH_TARGET_FIELDS = {"group", "version", "kind", "name"}


def kustomize_build(directory: Path) -> list[Manifest]:
    kustomization = load_documents(directory / "kustomization.yaml")[0]
    unknown = set(kustomization) - _KUSTOMIZATION_FIELDS
    assert not unknown, (
        f"{directory}: kustomization fields this renderer does not implement: {unknown}"
    )
    assert kustomization["kind"] == "Kustomization"
    resources: list[Manifest] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        assert path.is_relative_to(K8S), f"{directory}: resource outside k8s/: {entry}"
        resources += kustomize_build(path) if path.is_dir() else load_documents(path)
    for patch in kustomization.get("patches", []):
        _apply_patch(resources, patch, directory)
    if "namespace" in kustomization:
        for resource in resources:
            resource["metadata"]["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        _set_image(resources, image)
    ids = [resource_id(r) for r in resources]
    assert len(ids) == len(set(ids)), f"{directory}: a resource is defined twice"
    return resources


def resource_id(resource: Manifest) -> tuple[str, str]:
    return resource["kind"], resource["metadata"]["name"]


def _apply_patch(resources: list[Manifest], patch: Manifest, directory: Path) -> None:
    target = patch["target"]
    assert set(target) <= _PATCH_TARGET_FIELDS, f"{directory}: unsupported target {target}"
    operations = yaml.safe_load(patch["patch"])
    assert isinstance(operations, list), f"{directory}: only JSON 6902 patches are implemented"
    matched = [r for r in resources if _matches(r, target)]
    assert matched, f"{directory}: patch target {target} matches no resource"
    for resource in matched:
        for operation in operations:
            json_patch(resource, operation)


def _matches(resource: Manifest, target: Mapping[str, str]) -> bool:
    group, _, version = resource["apiVersion"].rpartition("/")
    actual = {"group": group, "version": version, "kind": resource["kind"]}
    actual["name"] = resource["metadata"]["name"]
    return all(actual[key] == value for key, value in target.items())


def json_patch(document: Manifest, operation: Mapping[str, Any]) -> None:
    """One RFC 6902 operation (add, replace, remove, test), in place."""
    op, path = operation["op"], operation["path"]
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]]
    parent: Any = document
    for token in tokens[:-1]:
        parent = parent[int(token)] if isinstance(parent, list) else parent[token]
    last = tokens[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        assert op == "add" or 0 <= index < len(parent), f"{path}: no such element"
        if op == "add":
            parent.insert(index, operation["value"])
        elif op == "replace":
            parent[index] = operation["value"]
        elif op == "remove":
            del parent[index]
        else:
            assert op == "test", f"{op}: not an operation this renderer implements"
            assert parent[index] == operation["value"], f"test {path} failed"
        return
    assert op == "add" or last in parent, f"{path}: no such member"
    if op in {"add", "replace"}:
        parent[last] = operation["value"]
    elif op == "remove":
        del parent[last]
    else:
        assert op == "test", f"{op}: not an operation this renderer implements"
        assert parent[last] == operation["value"], f"test {path} failed"


def _set_image(resources: list[Manifest], image: Mapping[str, str]) -> None:
    assert set(image) <= {"name", "newName", "newTag", "digest"}, f"images: {image}"
    for container in _containers(resources):
        name = re.split(r"@|:(?=[^/]*$)", container["image"])[0]
        if name == image["name"]:
            reference = image.get("newName", name)
            if "digest" in image:
                reference += "@" + image["digest"]
            elif "newTag" in image:
                reference += ":" + image["newTag"]
            container["image"] = reference


def _containers(resources: list[Manifest]) -> Iterator[Manifest]:
    for resource in resources:
        pod = resource.get("spec", {}).get("template", {}).get("spec", {})
        yield from pod.get("initContainers", [])
        yield from pod.get("containers", [])


# --- The Dockerfile -------------------------------------------------------------------------


@dataclass
class Stage:
    image: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, keyword: str) -> list[str]:
        return [value for kw, value in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        """What the stage's ENV instructions set, together."""
        env: dict[str, str] = {}
        for value in self.values("ENV"):
            env |= env_pairs(value)
        return env


def env_pairs(value: str) -> dict[str, str]:
    """The variables of one `ENV key=value …` instruction."""
    pairs: dict[str, str] = {}
    for pair in shlex.split(value):
        key, equals, val = pair.partition("=")
        assert equals, f"ENV {value}: use the key=value form"
        pairs[key] = val
    return pairs


def parse_dockerfile(text: str) -> dict[str, Stage]:
    """The stages by name, each with its instructions, continuations joined as Docker does."""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments are dropped even inside a continued instruction
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        keyword, _, value = (logical + line).partition(" ")
        logical = ""
        keyword, value = keyword.upper(), value.strip()
        if keyword == "FROM":
            words = value.split()
            assert len(words) == 3, f"FROM {value}: name each stage"
            assert words[1].upper() == "AS", f"FROM {value}: name each stage"
            current = stages[words[2]] = Stage(image=words[0], name=words[2])
        else:
            assert current is not None, f"{keyword} before the first FROM"
            current.instructions.append((keyword, value))
    return stages


DOCKERFILE = parse_dockerfile((ROOT / "Dockerfile").read_text())


def pinned_uv_version() -> str:
    image, _, version = DOCKERFILE["uv"].image.partition(":")
    assert image == "ghcr.io/astral-sh/uv", DOCKERFILE["uv"].image
    return version


def image_uid() -> int:
    (user,) = DOCKERFILE["runtime"].values("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), f"USER {user}: numeric, so that runAsNonRoot can check it"
    assert gid == uid, f"USER {user}: the group of the same number"
    return int(uid)


# --- .dockerignore --------------------------------------------------------------------------


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax (Go's filepath.Match plus `**`) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            char = pattern[i]
            out += {"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char))
            i += 1
    return re.compile(out)


@dataclass(frozen=True)
class DockerIgnore:
    rules: tuple[tuple[bool, str, re.Pattern[str]], ...]

    @classmethod
    def read(cls, path: Path) -> DockerIgnore:
        rules = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            keep = line.startswith("!")
            pattern = os.path.normpath(line.removeprefix("!").strip()).strip("/")
            rules.append((keep, pattern, _glob_regex(pattern)))
        return cls(tuple(rules))

    def excluded(self, relative: str) -> bool:
        """BuildKit's rule: the last pattern that matches the path or a parent decides."""
        parts = relative.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        verdict = False
        for keep, _, regex in self.rules:
            if any(regex.fullmatch(p) for p in prefixes):
                verdict = not keep
        return verdict

    def may_reinclude(self, directory: str) -> bool:
        return any(keep and p.startswith(directory + "/") for keep, p, _ in self.rules)


def build_context(destination: Path) -> list[str]:
    """Copy what `docker build .` would send; the relative paths sent."""
    ignore = DockerIgnore.read(ROOT / ".dockerignore")
    sent: list[str] = []
    for directory, subdirectories, files in os.walk(ROOT):
        here = Path(directory).relative_to(ROOT)
        subdirectories[:] = [
            d
            for d in subdirectories
            if not ignore.excluded((here / d).as_posix())
            or ignore.may_reinclude((here / d).as_posix())
        ]
        for name in files:
            relative = (here / name).as_posix()
            if not ignore.excluded(relative):
                (destination / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / relative, destination / relative)
                sent.append(relative)
    return sorted(sent)


# --- Processes ------------------------------------------------------------------------------


def run(
    argv: Sequence[str | Path],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - commands of this repository's Dockerfile and tools
        [str(a) for a in argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _usable_by_others(path: Path) -> bool:
    """Whether a user with no relation to its owner can run it (every parent searchable)."""
    real = path.resolve()
    return all(p.stat().st_mode & stat.S_IXOTH for p in (real, *real.parents))


def interpreter_for_the_image() -> Path:
    """A CPython 3.11 (the image's minor version) that the image's UID can execute.

    The one thing the replay cannot take from the image: its /usr/local/bin/python3.11. The
    test's own interpreter often lives under /root (pyenv), which another UID cannot enter;
    Debian's /usr/bin/python3.11 is one it can.
    """
    candidates = [Path(sys.executable)]
    candidates += [Path(p) for p in ("/usr/local/bin/python3.11", "/usr/bin/python3.11")]
    for candidate in candidates:
        if candidate.exists() and (os.geteuid() != 0 or _usable_by_others(candidate)):
            version = run([candidate, "-c", "import sys; print(sys.version_info[:2])"])
            if version.stdout.strip() == "(3, 11)":
                return candidate
    pytest.fail(f"no Python 3.11 that UID {image_uid()} may run among {candidates}")


def uv_on_path(bin_directory: Path) -> str:
    """A PATH whose `uv` is the Dockerfile's pinned version: this one, or uv fetching it."""
    version = pinned_uv_version()
    uv = shutil.which("uv")
    assert uv is not None, "uv is not on PATH (README: `pip install uv`)"
    if run([uv, "--version"]).stdout.split()[1] != version:
        bin_directory.mkdir(parents=True)
        wrapper = bin_directory / "uv"
        wrapper.write_text(f'#!/bin/sh\nexec "{uv}" tool run "uv@{version}" "$@"\n')
        wrapper.chmod(0o755)
        return f"{bin_directory}{os.pathsep}{os.environ['PATH']}"
    return os.environ["PATH"]


def as_image_user(argv: Sequence[str | Path], *, euid: int | None = None) -> list[str | Path]:
    """Run as the image's UID and GID with no supplementary groups (we are root in CI).

    Any other user cannot become the image's, and running as itself would prove nothing
    about the image: the test fails and says so.
    """
    euid = os.geteuid() if euid is None else euid
    uid = image_uid()
    if euid == uid:
        return list(argv)
    if euid != 0:
        pytest.fail(
            f"running as the image's UID {uid} needs root (setpriv); this is UID {euid}: "
            f"run the deploy checks as root, as CI does, or as UID {uid}"
        )
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed to drop to the image's user"
    return [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv]


@dataclass
class ReplayedImage:
    """The build stage, replayed into `root`: absolute image paths live under it."""

    root: Path

    def path(self, image_path: str) -> Path:
        return self.root / image_path.lstrip("/")


def replay_build_stage(root: Path, context: Path) -> ReplayedImage:
    stage = DOCKERFILE["build"]
    # The image's environment is the Dockerfile's ENV, not the CI job's: drop what would steer
    # uv or Python differently (a VIRTUAL_ENV from `uv run`, UV_* settings), keep uv's cache.
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("UV_", "PYTHON", "VIRTUAL_ENV"))
    }
    if "UV_CACHE_DIR" in os.environ:
        env["UV_CACHE_DIR"] = os.environ["UV_CACHE_DIR"]
    env["PATH"] = uv_on_path(root / "uv-bin")
    image = ReplayedImage(root=root / "image")
    workdir = image.path("/")
    for keyword, value in stage.instructions:
        if keyword == "ENV":
            for key, val in env_pairs(value).items():
                assert "$" not in val, f"ENV {key}: the replay does not expand variables"
                env[key] = str(image.path(val)) if val.startswith("/") else val
            env["UV_PYTHON"] = str(interpreter_for_the_image())
        elif keyword == "WORKDIR":
            workdir = image.path(value)
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            _replay_copy(value, context, workdir)
        elif keyword == "RUN":
            command = re.sub(r"^(--\S+\s+)*", "", value)  # --mount=… only changes caching
            result = run(["/bin/sh", "-c", command], env=env, cwd=workdir, timeout=600)
            assert result.returncode == 0, f"RUN {command}\n{result.stdout}\n{result.stderr}"
        else:
            pytest.fail(f"{keyword} in the build stage: teach the replay what it means")
    return image


def _replay_copy(value: str, context: Path, workdir: Path) -> None:
    words = shlex.split(value)
    flags = [w for w in words if w.startswith("--")]
    if flags:
        # Only uv's own binary comes from another stage; uv_on_path() provides that version.
        assert flags == ["--from=uv"], value
        assert words[-2:] == ["/uv", "/usr/local/bin/uv"], value
        return
    *sources, destination = words
    target = workdir / destination
    for source in sources:
        origin = context / source
        assert origin.exists(), f"COPY {source}: not in the build context (.dockerignore?)"
        if origin.is_dir():
            shutil.copytree(origin, target, dirs_exist_ok=True)
        else:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target / origin.name)


# --- Fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(
    scope="module", params=[BASE, *OVERLAYS], ids=lambda p: p.relative_to(K8S).as_posix()
)
def rendered(request: pytest.FixtureRequest) -> dict[tuple[str, str], Manifest]:
    """The resources of the base and of each overlay, by (kind, name)."""
    directory: Path = request.param
    return {resource_id(r): r for r in kustomize_build(directory)}


def _one(rendered: Mapping[tuple[str, str], Manifest], kind: str) -> Manifest:
    (resource,) = [r for (k, _), r in rendered.items() if k == kind]
    return resource


def _pod_spec(rendered: Mapping[tuple[str, str], Manifest]) -> Manifest:
    spec: Manifest = _one(rendered, "Deployment")["spec"]["template"]["spec"]
    return spec


def _container(rendered: Mapping[tuple[str, str], Manifest]) -> Manifest:
    (container,) = _pod_spec(rendered)["containers"]
    assert isinstance(container, dict)
    return container


def _config(rendered: Mapping[tuple[str, str], Manifest]) -> dict[str, str]:
    """The data of the ConfigMap the worker takes its environment from."""
    (source,) = _container(rendered)["envFrom"]
    data: dict[str, str] = rendered["ConfigMap", source["configMapRef"]["name"]]["data"]
    return data


def _setting(rendered: Mapping[tuple[str, str], Manifest], name: str) -> str:
    """The value the worker will see: the ConfigMap's, else the worker's default."""
    config = _config(rendered)
    if name in config:
        return config[name]
    (default,) = [f.default for f in Settings.model_fields.values() if f.validation_alias == name]
    return str(default)


# --- The image's install step ---------------------------------------------------------------


def test_the_image_user_check_fails_for_any_other_user_instead_of_running_as_it() -> None:
    uid = image_uid()
    assert as_image_user(["true"], euid=uid) == ["true"]
    assert as_image_user(["true"], euid=0)[-2:] == ["--", "true"]
    with pytest.raises(pytest.fail.Exception, match="needs root"):
        as_image_user(["true"], euid=1000)


@pytest.mark.timeout(600)
def test_the_image_install_step_yields_a_venv_that_runs_as_the_image_user(
    pyproject: dict[str, Any],
) -> None:
    # Not tmp_path: pytest makes that 0700 under root's name, and the image's UID must read it.
    root = Path(tempfile.mkdtemp(prefix="invite-worker-image-"))
    try:
        root.chmod(0o755)
        assert _usable_by_others(root) or os.geteuid() != 0, f"{root}: not searchable by others"
        context = root / "context"
        build_context(context)
        image = replay_build_stage(root, context)
        venv = image.path("/opt/venv")

        # The runtime stage copies /opt/venv alone: nothing of the sources may be needed.
        shutil.rmtree(context)
        shutil.rmtree(image.path("/src"))

        site = next(venv.glob("lib/python3.11/site-packages"))
        installed = {_normalized(p.name.split("-")[0]) for p in site.glob("*.dist-info")}
        direct = {_normalized(r) for r in pyproject["project"]["dependencies"]}
        assert direct <= installed, f"runtime dependencies missing: {direct - installed}"
        runtime = _locked_closure(pyproject["project"]["name"])
        for group, requirements in pyproject["dependency-groups"].items():
            names = {_normalized(r) for r in requirements if isinstance(r, str)}
            leaked = (names - runtime) & installed
            assert not leaked, f"dependency group {group} is in the image: {leaked}"
        assert not (site / "tests").exists(), "the test suite is in the image"
        # Compiled at build time: the read-only root filesystem will not take a .pyc later.
        assert list((site / "worker" / "__pycache__").glob("cli.cpython-311*.pyc"))

        runtime_env = {
            "PATH": f"{venv / 'bin'}{os.pathsep}/usr/local/bin:/usr/bin:/bin",
            "HOME": "/nonexistent",
        }
        for key, value in DOCKERFILE["runtime"].env().items():
            if key != "PATH":
                runtime_env[key] = value
        before = sorted(venv.rglob("*"))
        entrypoint = json.loads(DOCKERFILE["runtime"].values("ENTRYPOINT")[0])
        program = image.path(entrypoint[-1])  # tini is not replayed: it only execs this

        version = run(as_image_user([program, "--version"]), env=runtime_env)
        assert version.returncode == 0, version.stderr
        assert version.stdout.strip() == f"invite-worker {pyproject['project']['version']}"

        # The HEALTHCHECK's command, as that user: 1 with nothing listening, 0 once /healthz
        # answers 200.
        healthcheck = json.loads(DOCKERFILE["runtime"].values("HEALTHCHECK")[0].split("CMD", 1)[1])
        command = [image.path(healthcheck[0]), *healthcheck[1:]]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free_port = probe.getsockname()[1]
        down = run(as_image_user(command), env={**runtime_env, "HEALTH_PORT": str(free_port)})
        assert down.returncode == 1, (down.stdout, down.stderr)
        with _healthz_server() as port:
            up = run(as_image_user(command), env={**runtime_env, "HEALTH_PORT": str(port)})
        assert up.returncode == 0, (up.stdout, up.stderr)

        assert sorted(venv.rglob("*")) == before, "running the app wrote into its venv"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _normalized(requirement: str) -> str:
    """A requirement's distribution name, normalized as PEP 503 does."""
    name = re.split(r"[<>=!~ \[;]", requirement)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _locked_closure(project: str) -> set[str]:
    """The project's runtime dependencies in uv.lock, transitively (markers ignored)."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    dependencies = {
        p["name"]: {d["name"] for d in p.get("dependencies", [])} for p in lock["package"]
    }
    closure: set[str] = set()
    pending = [_normalized(project)]
    while pending:
        name = pending.pop()
        if name not in closure:
            closure.add(name)
            pending += dependencies.get(name, set())
    return closure


class _Healthz(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@contextlib.contextmanager
def _healthz_server() -> Iterator[int]:
    """A stand-in for the worker's health server, answering 200 on /healthz; its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_the_build_context_holds_the_app_and_nothing_else(tmp_path: Path) -> None:
    sent = build_context(tmp_path)
    outside = [p for p in sent if p not in {"pyproject.toml", "uv.lock", "README.md"}]
    assert "worker/__init__.py" in sent
    assert all(p.startswith("worker/") for p in outside), outside
    assert not [p for p in sent if "__pycache__" in p or p.endswith(".pyc")]
    secret_like = re.compile(r"(^|/)(\.env|.*\.(pem|key|p12|pfx)|id_[a-z0-9]+)$")
    assert not [p for p in sent if secret_like.search(p)]


def test_the_dockerfile_pins_its_images_and_uses_one_python(pyproject: dict[str, Any]) -> None:
    assert list(DOCKERFILE) == ["uv", "tini", "build", "runtime"]
    pythons = {s.image for s in DOCKERFILE.values() if s.name != "uv"}
    assert len(pythons) == 1, f"the venv's interpreter must be the runtime's: {pythons}"
    (python,) = pythons
    assert re.fullmatch(r"python:3\.11[.\w-]*-slim[\w-]*(@sha256:[0-9a-f]{64})?", python), python
    assert pyproject["project"]["requires-python"] == ">=3.11"
    # The uv of the image is the uv of CI (.ci/ensure installs it for .ci/run and the Makefile,
    # and the replay uses it).
    ci = (ROOT / ".ci" / "ensure").read_text()
    assert f"UV_VERSION={pinned_uv_version()}\n" in ci


def test_the_runtime_stage_is_non_root_labelled_healthchecked_and_behind_tini(
    pyproject: dict[str, Any],
) -> None:
    runtime = DOCKERFILE["runtime"]
    assert image_uid() >= 10_000, "a UID that no host account is likely to have"
    copies = [shlex.split(v) for v in runtime.values("COPY")]
    assert all(c[0].startswith("--from=") for c in copies), "nothing from the build context"
    assert {c[0] for c in copies} == {"--from=tini", "--from=build"}
    assert ["--from=build", "/opt/venv", "/opt/venv"] in copies

    labels = dict(pair.split("=", 1) for pair in shlex.split(" ".join(runtime.values("LABEL"))))
    assert labels["org.opencontainers.image.version"] == pyproject["project"]["version"]
    assert labels["org.opencontainers.image.version"] == __version__
    for key in ("source", "revision", "title", "licenses"):
        assert f"org.opencontainers.image.{key}" in labels

    entrypoint = json.loads(runtime.values("ENTRYPOINT")[0])
    assert entrypoint == ["/usr/bin/tini", "--", "/opt/venv/bin/invite-worker"]
    assert json.loads(runtime.values("CMD")[0]) == ["run"]
    (healthcheck,) = runtime.values("HEALTHCHECK")
    assert json.loads(healthcheck.split("CMD", 1)[1]) == [
        "/opt/venv/bin/invite-worker",
        "healthcheck",
    ]
    env = runtime.env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert runtime.values("EXPOSE") == [env["HEALTH_PORT"]]
    assert DOCKERFILE["build"].env()["UV_PROJECT_ENVIRONMENT"] == "/opt/venv"


# --- Manifests: loading, rendering, schemas -------------------------------------------------


def test_every_manifest_loads_and_every_base_file_is_a_resource() -> None:
    files = sorted(K8S.rglob("*.yaml"))
    assert files
    for path in files:
        for doc in load_documents(path):
            assert {"apiVersion", "kind"} <= set(doc), path
            assert doc["kind"] == "Kustomization" or doc["metadata"]["name"], path
    listed = set(load_documents(BASE / "kustomization.yaml")[0]["resources"])
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml", SECRET_TEMPLATE.name}
    assert listed == on_disk
    assert OVERLAYS, "an example overlay"


def test_the_base_and_the_overlays_render(rendered: dict[tuple[str, str], Manifest]) -> None:
    assert {kind for kind, _ in rendered} - set(TOPOLOGY_KINDS) == {
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "TriggerAuthentication",
        "ScaledObject",
        "PodMonitor",
        "PrometheusRule",
    }
    namespaces = {r["metadata"].get("namespace") for r in rendered.values()}
    assert len(namespaces) == 1, namespaces
    assert None not in namespaces


def _validate(resource: Manifest) -> None:
    key = (resource["apiVersion"], resource["kind"])
    if key in CRD_SCHEMAS:
        schema = json.loads(CRD_SCHEMAS[key].read_text())
        jsonschema.Draft202012Validator(schema).validate(resource)
    else:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_every_resource_is_valid_for_the_pinned_kubernetes_and_the_operators_schemas(
    rendered: dict[tuple[str, str], Manifest],
) -> None:
    for resource in [*rendered.values(), *load_documents(SECRET_TEMPLATE)]:
        try:
            _validate(resource)
        except jsonschema.ValidationError as error:  # kubernetes-validate's error subclasses it
            path = ".".join(str(p) for p in error.absolute_path)
            pytest.fail(f"{resource_id(resource)} at {path}: {error.message}")


def test_the_crd_schemas_are_schemas_and_the_keda_ones_refuse_what_keda_would() -> None:
    for path in CRD_SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text()))
    scaled = next(r for r in load_documents(BASE / "scaledobject.yaml"))
    broken = json.loads(json.dumps(scaled))
    broken["spec"]["triggers"][0]["metadata"]["value"] = 500  # KEDA wants strings only
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken)
    broken = json.loads(json.dumps(scaled))
    broken["spec"]["maxReplicas"] = 3  # the HPA's spelling, not KEDA's
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken)


def test_the_prometheus_operator_schemas_refuse_what_the_api_server_would() -> None:
    monitor = load_documents(BASE / "podmonitor.yaml")[0]
    rule = load_documents(BASE / "prometheusrule.yaml")[0]
    _validate(monitor)
    _validate(rule)
    broken = json.loads(json.dumps(monitor))
    broken["spec"]["endpoints"] = broken["spec"].pop("podMetricsEndpoints")  # ServiceMonitor's
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken)
    broken = json.loads(json.dumps(monitor))
    broken["spec"]["podMetricsEndpoints"][0]["interval"] = "30 seconds"  # not a duration
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken)
    broken = json.loads(json.dumps(rule))
    broken["spec"]["groups"][0]["rules"][0]["expression"] = "up"  # the field is `expr`
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken)
    broken = json.loads(json.dumps(rule))
    broken["spec"]["groups"][0]["rules"][0]["for"] = 300  # a duration string, not seconds
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken)


def test_the_renderer_implements_json_patch() -> None:
    document: Manifest = {"a": {"b": [1, 2]}, "c~/d": 1}
    json_patch(document, {"op": "add", "path": "/a/b/-", "value": 3})
    json_patch(document, {"op": "replace", "path": "/a/b/0", "value": 0})
    json_patch(document, {"op": "remove", "path": "/c~0~1d"})
    json_patch(document, {"op": "test", "path": "/a/b/2", "value": 3})
    assert document == {"a": {"b": [0, 2, 3]}}
    with pytest.raises(AssertionError):
        json_patch(document, {"op": "replace", "path": "/a/x", "value": 1})


# --- Manifests: what the files must agree on ------------------------------------------------


def test_the_configmap_holds_settings_and_no_credentials(
    rendered: dict[tuple[str, str], Manifest],
) -> None:
    settings = {f.validation_alias for f in Settings.model_fields.values()}
    config = _config(rendered)
    assert set(config) <= settings, f"not settings the worker reads: {set(config) - settings}"
    assert not set(config) & CREDENTIALS
    secret = load_documents(SECRET_TEMPLATE)[0]
    assert set(secret["stringData"]) <= settings & CREDENTIALS
    assert "data" not in secret, "the template holds placeholders, never encoded values"
    for env in _container(rendered)["env"]:
        reference = env["valueFrom"]["secretKeyRef"]
        assert reference["name"] == secret["metadata"]["name"]
        assert reference["key"] in secret["stringData"]
        assert env["name"] in CREDENTIALS


def test_the_pod_runs_as_the_image_user_locked_down(
    rendered: dict[tuple[str, str], Manifest],
) -> None:
    pod, container = _pod_spec(rendered), _container(rendered)
    assert pod["securityContext"]["runAsUser"] == image_uid()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert _one(rendered, "ServiceAccount")["automountServiceAccountToken"] is False
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"]  # noqa: S108
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}
    spreads = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert spreads["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"


def test_ports_probes_and_grace_period_match_the_worker(
    rendered: dict[tuple[str, str], Manifest],
) -> None:
    pod, container = _pod_spec(rendered), _container(rendered)
    (port,) = container["ports"]
    assert port["containerPort"] == int(_setting(rendered, "HEALTH_PORT"))
    assert DOCKERFILE["runtime"].env()["HEALTH_PORT"] == _setting(rendered, "HEALTH_PORT")
    probes = {name: container[name]["httpGet"] for name in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"] == {"path": "/healthz", "port": port["name"]}
    assert probes["readinessProbe"] == {"path": "/readyz", "port": port["name"]}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    # SIGTERM, then up to SHUTDOWN_GRACE_PERIOD of draining, then closing and exiting.
    # There is no preStop hook (deployment.yaml says why); one would have to fit in too.
    grace = float(_setting(rendered, "SHUTDOWN_GRACE_PERIOD"))
    assert "lifecycle" not in container
    assert pod["terminationGracePeriodSeconds"] >= grace + 10
    service = _one(rendered, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert service["spec"]["publishNotReadyAddresses"] is True
    # The PodMonitor scrapes what the health server serves, on the port the policy opens.
    (endpoint,) = _one(rendered, "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == (port["name"], "/metrics")
    (ingress,) = _one(rendered, "NetworkPolicy")["spec"]["ingress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": port["name"]}]


def test_every_selector_selects_the_pods(rendered: dict[tuple[str, str], Manifest]) -> None:
    deployment = _one(rendered, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        _one(rendered, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        _one(rendered, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
        _one(rendered, "Service")["spec"]["selector"],
        _one(rendered, "PodMonitor")["spec"]["selector"]["matchLabels"],
        *[
            c["labelSelector"]["matchLabels"]
            for c in _pod_spec(rendered)["topologySpreadConstraints"]
        ],
    ]
    for selector in selectors:
        assert selector.items() <= labels.items(), selector
    assert (
        _pod_spec(rendered)["serviceAccountName"]
        == _one(rendered, "ServiceAccount")["metadata"]["name"]
    )


def test_egress_is_dns_the_broker_redis_and_https_only(
    rendered: dict[tuple[str, str], Manifest],
) -> None:
    policy = _one(rendered, "NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    ports = {(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]}
    assert ports == {
        ("UDP", 53),
        ("TCP", 53),
        ("TCP", 5671),
        ("TCP", 5672),
        ("TCP", 6379),
        ("TCP", 6380),
        ("TCP", 443),
    }
    for rule in policy["egress"]:
        for peer in rule["to"]:
            if "ipBlock" in peer:  # the internet: HTTPS only, never the metadata service
                assert {p["port"] for p in rule["ports"]} == {443}
                assert peer["ipBlock"]["cidr"] in {"0.0.0.0/0", "::/0"}
    internet = [p["ipBlock"] for r in policy["egress"] for p in r["to"] if "ipBlock" in p]
    assert any("169.254.0.0/16" in block.get("except", []) for block in internet)


def test_keda_scales_the_deployment_on_the_command_queue_within_graph_limits(
    rendered: dict[tuple[str, str], Manifest],
) -> None:
    scaled = _one(rendered, "ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == _one(rendered, "Deployment")["metadata"]["name"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == _setting(rendered, "COMMAND_QUEUE")
    assert "host" not in trigger["metadata"], "credentials only through the TriggerAuthentication"
    authentication = rendered["TriggerAuthentication", trigger["authenticationRef"]["name"]]
    secret = load_documents(SECRET_TEMPLATE)[0]
    (reference,) = authentication["spec"]["secretTargetRef"]
    assert reference["parameter"] == "host"
    assert (reference["name"], reference["key"]) == (secret["metadata"]["name"], "AMQP_URL")
    # With REDIS_URL the pods share GRAPH_TENANT_RATE_LIMIT; without it every pod may send that
    # much to the same tenant.
    rate = int(_setting(rendered, "GRAPH_TENANT_RATE_LIMIT"))
    worker = _one(rendered, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    shared = any(
        variable["name"] == "REDIS_URL"
        and variable["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
        and variable["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"]
        for variable in worker["env"]
    )
    pods_sending = 1 if shared else scaled["maxReplicaCount"]
    assert pods_sending * rate <= GRAPH_REQUESTS_PER_SECOND_PER_TENANT
    # The budget lets one pod go while the other keeps consuming.
    budget = _one(rendered, "PodDisruptionBudget")["spec"]
    assert scaled["minReplicaCount"] - budget["maxUnavailable"] >= 1
    assert scaled["minReplicaCount"] <= scaled["maxReplicaCount"]


# --- The topology-operator overlay ----------------------------------------------------------


def test_the_topology_schemas_are_schemas_and_refuse_what_the_operator_would() -> None:
    for path in TOPOLOGY_SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text()))
    [queue, *_] = load_documents(TOPOLOGY_OVERLAY / "queues.yaml")
    [policy] = load_documents(TOPOLOGY_OVERLAY / "policies.yaml")
    [binding, *_] = load_documents(TOPOLOGY_OVERLAY / "bindings.yaml")
    broken: list[Manifest] = []
    for document, (section, key), value in [
        (queue, ("spec", "rabbitmqClusterReference"), None),  # required by the CRD
        (queue, ("spec", "deletionPolicy"), "keep"),  # delete or retain
        (queue, ("spec", "arguments"), ["x-queue-type", "quorum"]),  # an object
        (queue, ("spec", "maxLength"), 10),  # not a field: an argument or a policy
        (policy, ("spec", "applyTo"), "quorum"),  # quorum_queues
        (policy, ("spec", "definition"), None),  # required by the CRD
        (binding, ("spec", "destinationType"), "topic"),  # exchange or queue
    ]:
        copy = json.loads(json.dumps(document))
        if value is None:
            del copy[section][key]
        else:
            copy[section][key] = value
        broken.append(copy)
    for document in broken:
        with pytest.raises(jsonschema.ValidationError):
            _validate(document)


def test_the_topology_operator_overlay_provisions_what_the_worker_declares() -> None:
    rendered = {resource_id(r): r for r in kustomize_build(TOPOLOGY_OVERLAY)}
    config = _config(rendered)
    assert config["DECLARE_TOPOLOGY"] == "false"
    settings = isolated_settings(dict(config))
    assert settings.declare_topology is False
    exchanges, queues = topology_objects(settings)
    specs = {
        kind: [r["spec"] for (k, _), r in rendered.items() if k == kind] for kind in TOPOLOGY_KINDS
    }
    cluster = {"name": "rabbitmq", "namespace": "messaging"}
    for spec in [s for kind in TOPOLOGY_KINDS for s in specs[kind]]:
        assert spec["rabbitmqClusterReference"] == cluster
        assert spec.get("vhost", "/") == "/"

    declared_queues = {
        q["name"]: {**q.get("arguments", {}), "x-queue-type": q["type"]} for q in specs["Queue"]
    }
    assert declared_queues == {q.name: q.arguments for q in queues}
    for spec in specs["Queue"]:
        assert spec["durable"] is True
        assert spec["autoDelete"] is False
        assert spec["deletionPolicy"] == "retain", "deleting the resource keeps the messages"
    declared_exchanges = {
        e["name"]: (e["type"], e.get("arguments", {}), e["durable"]) for e in specs["Exchange"]
    }
    assert declared_exchanges == {e.name: (e.type.value, e.arguments, True) for e in exchanges}
    declared_bindings = {
        (b["source"], b["destination"], b["destinationType"], b["routingKey"])
        for b in specs["Binding"]
    }
    # aio-pika binds a queue with its own name as the routing key.
    assert declared_bindings == {
        (q.bound_to, q.name, "queue", q.name) for q in queues if q.bound_to is not None
    }

    [policy] = specs["Policy"]
    applies_to = [q.name for q in queues if re.search(policy["pattern"], q.name)]
    assert applies_to == [settings.command_queue]
    assert policy["applyTo"] == "quorum_queues"
    command_queue = next(q for q in queues if q.name == settings.command_queue)
    for key, value in policy["definition"].items():
        assert command_queue.arguments[f"x-{key}"] == value, key
    assert {"dead-letter-exchange", "delivery-limit"} <= set(policy["definition"])

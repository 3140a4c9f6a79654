# One task runner for laptops and CI. `uv run --frozen` installs exactly what uv.lock pins.
# `.ci/ensure` installs uv from PyPI when it is missing and starts the services the tests need;
# the directories pip installs scripts into are on the PATH, so a uv it installed is found.
export PATH := $(shell .ci/ensure bin-path):$(PATH)
RUN := uv run --frozen

.PHONY: install test lint format typecheck schemas deploy-check check demo run simulator

install:  ## the virtual environment, from the lock file
	.ci/ensure uv
	uv sync --frozen

test:  ## the whole test suite: uv, RabbitMQ on 127.0.0.1:5672, Redis on :6379 and promtool made sure of first
	.ci/ensure uv rabbitmq redis
	.ci/promtool
	$(RUN) pytest

lint:
	$(RUN) ruff check .
	$(RUN) ruff format --check .

format:
	$(RUN) ruff check --fix .
	$(RUN) ruff format .

typecheck:
	$(RUN) mypy

schemas:  ## regenerate schemas/ from the models
	$(RUN) invite-worker schemas --directory schemas

# The image and k8s/ without a Docker engine or a cluster: hadolint, yamllint, then
# tests/deploy/ (the image's install step replayed and run as its user; every manifest rendered and
# validated against Kubernetes 1.30 and the operators' schemas in k8s/schemas/; the alerts
# through `promtool check rules` and `promtool test rules`, which `.ci/promtool` installs), then
# checkov.
# checkov pins packaging<24, which the dev group's pytest cannot use, so it has a locked group of
# its own (pyproject.toml) installed into a throwaway environment, never beside the tests.
CHECKOV := uv run --frozen --isolated --only-group checkov checkov --quiet --compact --skip-download
deploy-check:  ## Dockerfile and k8s/ checks and the alert rule tests (no Docker engine or cluster needed)
	.ci/promtool
	$(RUN) hadolint --config .hadolint.yaml Dockerfile
	$(RUN) yamllint --strict --config-file .yamllint .yamllint .hadolint.yaml k8s/ tests/deploy/
	$(RUN) pytest -q tests/deploy/
	$(CHECKOV) --framework dockerfile --file Dockerfile
	$(CHECKOV) --framework kubernetes --directory k8s

check: lint typecheck test deploy-check

demo:  ## the whole job on this machine: RabbitMQ, simulator, worker, the document's examples
	.ci/ensure uv rabbitmq
	$(RUN) invite-worker demo

run:  ## the production process, configured by environment variables
	$(RUN) invite-worker run

simulator:  ## the local HTTPS Graph and Entra ID stand-in
	$(RUN) invite-worker simulator

.PHONY: bench
bench:  ## the benchmark (not a test): worker vs the floor; writes benchmarks/results/latest.{json,md}
	.ci/rabbitmq
	uv run --frozen --group bench python -m benchmarks.run

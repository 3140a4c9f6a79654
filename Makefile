# One task runner for laptops and CI. `uv run --frozen` installs exactly what uv.lock pins.
RUN := uv run --frozen

.PHONY: install test lint format typecheck schemas check demo run simulator

install:  ## the virtual environment, from the lock file
	uv sync --frozen

test:  ## the whole test suite (needs RabbitMQ on 127.0.0.1:5672; `.ci/rabbitmq` starts it)
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

check: lint typecheck test

demo:  ## the whole job on this machine: RabbitMQ, simulator, worker, the document's examples
	.ci/rabbitmq
	$(RUN) invite-worker demo

run:  ## the production process, configured by environment variables
	$(RUN) invite-worker run

simulator:  ## the local HTTPS Graph and Entra ID stand-in
	$(RUN) invite-worker simulator

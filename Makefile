# The two commands: `make run` starts the whole system locally, `make test`
# installs what the tests need and runs them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)

.PHONY: run test lint mutation venv system-packages migrate demo bench clean help manifests check-manifests deploy

help:
	@echo "make run    - start the whole system locally (embedded PostgreSQL unless DATABASE_URL)"
	@echo "make test   - install what the tests need, lint (ruff) and run the whole suite"
	@echo "make demo   - send the seed's test alerts to a running 'make run'"
	@echo "make bench  - benchmarks, reported as ratios to baselines measured in the same run"
	@echo "make mutation [MODULES=\"rails actions\"] - mutation score of the critical modules -> docs/mutation.md"

$(VENV)/.installed: requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@touch $@

venv: $(VENV)/.installed

system-packages:
	@scripts/ensure-system-packages.sh

# The linter runs first: a finding fails `make test`.
test: lint system-packages
	@url=$$(scripts/ensure-postgres.sh) && \
	TEST_DATABASE_URL="$$url" $(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

run: venv
	$(PY) -m local.run

migrate: venv
	$(PY) -m shared.migrate

demo: venv
	$(PY) -m local.demo

bench: venv system-packages
	@url=$$(scripts/ensure-postgres.sh) && TEST_DATABASE_URL="$$url" $(PY) bench/run.py

# Mutation testing (cosmic-ray), one worker, each module against its fast
# tests; under an hour on a 2-core machine. Not part of `make test`.
mutation: venv
	@url=$$(scripts/ensure-postgres.sh) && TEST_DATABASE_URL="$$url" $(PY) scripts/mutation.py $(MODULES)

manifests: venv
	$(PY) -m deploy.manifests

check-manifests: venv
	$(PY) -m deploy.manifests --check
	$(VENV)/bin/kubectl kustomize knative/overlays/production > /dev/null

# Against a real cluster with Knative Serving and Eventing (docs/deploy.md):
# migrate first, then roll out.
deploy: check-manifests
	@mkdir -p .run
	$(VENV)/bin/kubectl kustomize knative/overlays/production > .run/production.yaml
	kubectl apply -f .run/production.yaml -l '!app.kubernetes.io/component'
	kubectl -n production delete job incident-migrate --ignore-not-found
	kubectl apply -f .run/production.yaml -l app.kubernetes.io/component=migrate
	kubectl -n production wait --for=condition=complete job/incident-migrate --timeout=300s
	kubectl apply -f .run/production.yaml

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts

# The two commands: `make run` starts the whole system locally, `make test`
# installs what the tests need and runs them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)

.PHONY: run test lint mutation venv system-packages migrate demo bench clean help manifests check-manifests deploy kn-commands image

help:
	@echo "make run    - start the whole system locally (embedded PostgreSQL unless DATABASE_URL)"
	@echo "make test   - install what the tests need, lint (ruff) and run the whole suite"
	@echo "make demo   - send the seed's test alerts to a running 'make run'"
	@echo "make bench  - benchmarks, reported as ratios to baselines measured in the same run"
	@echo "make mutation [MODULES=\"rails actions\"] - mutation score of the critical modules -> docs/mutation.md"
	@echo "make image IMAGE=registry/incident-response:tag [BASE_IMAGE=...] [CA_BUNDLE=...] - build the image"
	@echo "make deploy - migrate and roll out knative/overlays/production (kubectl); make kn-commands IMAGE=... - the same as kn commands"

# The tests and tools need requirements-dev.txt, which includes the runtime
# requirements.txt (the only file the image installs).
$(VENV)/.installed: requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
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

# Mutation testing (cosmic-ray), two workers (MUTATION_WORKERS); each mutant
# runs only the tests that reach the lines it changed (scripts/mutation.py,
# docs/mutation-notes.md). Under an hour on a 2-core machine; not part of
# `make test`.
mutation: venv
	@url=$$(scripts/ensure-postgres.sh) && TEST_DATABASE_URL="$$url" $(PY) scripts/mutation.py $(MODULES)

manifests: venv
	$(PY) -m deploy.manifests

check-manifests: venv
	$(PY) -m deploy.manifests --check
	$(VENV)/bin/kubectl kustomize knative/overlays/production > /dev/null

# The image (docs/deploy.md step 2): IMAGE=registry/incident-response:tag,
# optional BASE_IMAGE=..., CA_BUNDLE=/path/ca.pem (a build secret, not kept).
image:
	@IMAGE="$(or $(IMAGE),incident-response:dev)" BASE_IMAGE="$(BASE_IMAGE)" CA_BUNDLE="$(CA_BUNDLE)" scripts/build-image.sh

# The same deployment as kn commands (docs/deploy.md): IMAGE=registry/incident-response:tag,
# SKIP_SECRETS="slack-webhook ..." for optional Secrets not created.
kn-commands: venv
	@test -n "$(IMAGE)" || { echo "set IMAGE=registry/incident-response:tag" >&2; exit 2; }
	@$(PY) -m deploy.kn --image "$(IMAGE)" $(foreach s,$(SKIP_SECRETS),--skip-secret $(s))

# Against a real cluster with Knative Serving and Eventing (docs/deploy.md):
# migrate first, then roll out. The Services' manifests name their traffic
# (all to the latest revision), so this also ends a rollback's pin.
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

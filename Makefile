# nuclide: `make run` starts the stack, `make test` runs the tests. Both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run sandbox-tools test test-unit test-integration install bench load clean images up down swarm-up swarm-down mutate

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "nuclide needs Python 3.11 or newer")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { echo "could not create $(VENV): on Debian run 'apt-get install python3-venv'"; exit 1; }
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

# what the process backend's sandbox needs (services/deployer/sandbox.py): installed when we are root on
# Debian, else named; `nuclide up` refuses to start instances without it (unless NUCLIDE_SANDBOX=none)
SANDBOX_PACKAGES := bubblewrap slirp4netns

sandbox-tools:
	@command -v bwrap >/dev/null && command -v slirp4netns >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing the sandbox's tools: $(SANDBOX_PACKAGES)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SANDBOX_PACKAGES) >/dev/null \
	      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SANDBOX_PACKAGES) >/dev/null; }; \
	  else \
	    echo "the sandbox needs $(SANDBOX_PACKAGES); run: sudo apt-get install $(SANDBOX_PACKAGES)"; \
	  fi; }

run: $(STAMP) sandbox-tools
	$(VENV)/bin/nuclide up

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

test-integration: $(STAMP)
	$(PY) -m pytest -q tests/integration

# mutation testing (mutmut) of the modules that hold the guarantees, each with its tests; slow, not in CI.
# MUTATE_GROUPS="archive auth" runs some groups (see tests/mutate.py)
MUTATE_GROUPS ?=
mutate: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[mutate]'
	$(PY) -m tests.mutate $(MUTATE_GROUPS)

bench: $(STAMP)
	$(PY) -m tests.bench

# container images for the docker backend and docker-compose, built locally (no registry); incremental
images: $(STAMP)
	PYTHON=$(PY) deploy/images/build.sh

# the stack under docker-compose: `make up` prints the URL and token, `make down` stops it all
up: images
	PYTHON=$(PY) deploy/compose.sh up

down:
	deploy/compose.sh down

# the stack on Docker Swarm (deploy/swarm/stack.yml): `make swarm-up` prints the URL and token, `make swarm-down` removes it
swarm-up: $(STAMP)
	PYTHON=$(PY) deploy/swarm.sh up

swarm-down:
	deploy/swarm.sh down

LOAD_ARGS ?= --self-contained
load: $(STAMP)
	$(PY) -m tests.load $(LOAD_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache

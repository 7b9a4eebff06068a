# Concord — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
APT_STAMP := $(VENV)/.apt-stamp
# Debian packages the test suite runs for real: promtool/prometheus (ops rules and the live check),
# chromium + chromedriver (the owner inbox page), postgresql (the sandbox command target on a throwaway cluster).
APT_PACKAGES := prometheus chromium chromium-driver postgresql

.DEFAULT_GOAL := help
# Apache Kafka: fetched with mvn from Maven Central into a cache outside the venv (make clean keeps it).
KAFKA_VERSION ?= $(shell $(PYTHON) -c 'import re,pathlib;print(re.search(r"KAFKA_VERSION = \"([^\"]+)\"",pathlib.Path("concord/runtime/broker.py").read_text())[1])')
KAFKA_CACHE := $(or $(CONCORD_CACHE_DIR),$(HOME)/.cache/concord)/kafka-$(KAFKA_VERSION)
KAFKA_STAMP := $(KAFKA_CACHE)/libs/.complete
JAVA_PACKAGES := openjdk-17-jre-headless maven

.PHONY: help install demo test test-kafka kafka kafka-fetch java lint bench chaos fuzz clean system-packages

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@echo ">> creating $(VENV) and installing Concord with its test extras"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,dev]'
	@touch $@

install: $(STAMP) ## create .venv and install Concord into it

system-packages: $(APT_STAMP) ## install the Debian packages tests use (needs root or sudo)

$(APT_STAMP): Makefile | $(STAMP)  # a new package in the list re-runs the check
	@missing=""; for c in promtool prometheus chromium chromedriver; do command -v $$c >/dev/null || missing=1; done; \
	for c in initdb pg_ctl postgres; do command -v $$c >/dev/null || ls /usr/lib/postgresql/*/bin/$$c >/dev/null 2>&1 \
	  || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  echo ">> installing Debian packages: $(APT_PACKAGES)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	fi
	@touch $@

demo: $(STAMP) ## run the main job on an embedded broker with the business simulator, then report (DEMO_ARGS=--serve keeps it up with the owners' inbox)
	@case " $(DEMO_ARGS) " in *" --serve "*) ;; *) echo ">> tip: make demo DEMO_ARGS=--serve keeps broker, worker and adapters running after the report and prints the owners' inbox address with a credential per team (Ctrl-C stops)";; esac
	@# the embedded broker, as the README promises, even where Kafka is cached (CONCORD_BROKER=kafka to try it)
	CONCORD_BROKER=$${CONCORD_BROKER:-embedded} $(VENV)/bin/concord demo $(DEMO_ARGS)

# The broker tests mostly wait on brokers and the processes they start: TEST_WORKERS processes (xdist; two, as three
# overloaded two cores in some runs) share
# them out, each with its own session brokers. TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
test: $(STAMP) $(APT_STAMP) $(KAFKA_STAMP) ## the whole suite, broker tests on the embedded broker and on Apache Kafka
	$(PY) -m pytest -n $(TEST_WORKERS) --brokers=tansu,kafka $(PYTEST_ARGS)

test-kafka: $(STAMP) $(APT_STAMP) $(KAFKA_STAMP) ## the broker tests on Apache Kafka alone (KAFKA_VERSION=3.9.2 for the 3.9 line)
	$(PY) -m pytest -m broker --brokers=kafka-$(KAFKA_VERSION) $(PYTEST_ARGS)

java: ## install Java 17 and Maven from Debian where missing (needs root or sudo)
	@if ! command -v java >/dev/null || ! command -v mvn >/dev/null; then \
	  echo ">> installing Debian packages: $(JAVA_PACKAGES)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(JAVA_PACKAGES) >/dev/null; \
	fi

$(KAFKA_STAMP): | $(STAMP)  # delete the cache dir to fetch again
	@$(MAKE) --no-print-directory java
	$(PY) -m concord.runtime.broker --version $(KAFKA_VERSION) --fetch-only

kafka-fetch: $(KAFKA_STAMP) ## fetch Apache Kafka $(KAFKA_VERSION) into the cache (once)

kafka: $(KAFKA_STAMP) ## run an Apache Kafka broker on a free loopback port until Ctrl-C (KAFKA_ARGS="--nodes 3")
	$(PY) -m concord.runtime.broker --version $(KAFKA_VERSION) $(KAFKA_ARGS)

lint: $(STAMP) ## ruff and mypy
	$(VENV)/bin/ruff check concord connectors schemas tests
	$(VENV)/bin/mypy concord connectors schemas

bench: $(STAMP) ## throughput and latency on the embedded broker; prints a `bench:` line
	CONCORD_BROKER=$${CONCORD_BROKER:-embedded} $(VENV)/bin/concord bench $(BENCH_ARGS)

chaos: $(STAMP) ## kill workers and adapters under load (SIGKILL, SIGTERM, two workers); prints a `chaos:` line
	CONCORD_BROKER=$${CONCORD_BROKER:-embedded} $(VENV)/bin/concord chaos $(CHAOS_ARGS)

fuzz: $(STAMP) ## mutated vendor payloads per connector and signed hostile bodies at the receiver; prints a `fuzz:` line
	$(PY) -m connectors.inbound.fuzz $(FUZZ_ARGS)

clean: ## remove the virtual environment and local state
	rm -rf $(VENV) .concord .pytest_cache .hypothesis

# Kafka Connect with Debezium's PostgreSQL connector (ops/connect): fetched with mvn into the same cache, once.
.PHONY: connect-fetch stack
CONNECT_VERSIONS := $(shell $(PYTHON) -c 'import re,pathlib;t=pathlib.Path("concord/runtime/broker.py").read_text();print(re.search(r"CONNECT_VERSION = \"([^\"]+)\"",t)[1]+"-debezium-"+re.search(r"DEBEZIUM_VERSION = \"([^\"]+)\"",t)[1])')
CONNECT_STAMP := $(or $(CONCORD_CACHE_DIR),$(HOME)/.cache/concord)/connect-$(CONNECT_VERSIONS)/libs/.complete

$(CONNECT_STAMP): | $(STAMP)  # delete the cache dir to fetch again
	@$(MAKE) --no-print-directory java
	$(PY) -m concord.runtime.broker --fetch-connect

connect-fetch: $(CONNECT_STAMP) ## fetch Kafka Connect and the Debezium PostgreSQL connector into the cache (once)

# the Debezium test runs Connect against Apache Kafka: both test targets need its jars
test test-kafka: $(CONNECT_STAMP)

# Stripe's own mock server (validates requests against Stripe's OpenAPI spec): built from the Go module proxy, once.
.PHONY: stripe-mock
STRIPE_MOCK_VERSION := v0.203.0
STRIPE_MOCK := $(or $(CONCORD_CACHE_DIR),$(HOME)/.cache/concord)/stripe-mock-$(STRIPE_MOCK_VERSION)/stripe-mock

$(STRIPE_MOCK):
	@if ! command -v go >/dev/null; then \
	  echo ">> installing Debian's golang-go"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends golang-go >/dev/null; \
	fi
	@echo ">> building stripe-mock $(STRIPE_MOCK_VERSION) from the Go module proxy (about 1.5 min, once)"
	GOBIN=$(dir $(STRIPE_MOCK)) go install github.com/stripe/stripe-mock@$(STRIPE_MOCK_VERSION)

stripe-mock: $(STRIPE_MOCK) ## build Stripe's mock server into the cache (once); the Stripe adapter's contract tests run on it
test test-kafka: $(STRIPE_MOCK)
test test-kafka: export CONCORD_STRIPE_MOCK := $(STRIPE_MOCK)

stack: $(STAMP) $(APT_STAMP) $(KAFKA_STAMP) $(CONNECT_STAMP) ## the compose deployment without Docker: Kafka, Connect + Debezium, relay, two workers, webhooks, adapters, Prometheus (STACK_ARGS="--fresh"); Ctrl-C stops
	$(PY) -m concord.tools.stack $(STACK_ARGS)

# Settle: run `make help` for the targets.
SHELL := bash
CARGO ?= cargo
SETTLE_RELEASE := target/release/settle

.PHONY: help build build-cli invoke-dispatcher invoke-worker invoke-reducer deploy lint-template cost demo run test test-steps fmt lint bench bench-memory bench-jsonl bench-http bench-exec bench-flow bench-node soak clean venv browser ui-screenshots emulator-up emulator-down venv-sam sam-build stack-up

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

build-cli: ## Release build of the settle CLI
	$(CARGO) build --release -p settle-cli

# The workspace's release profile keeps line tables for profiling the CLI;
# a Lambda bundle does not need them: stripped, the worker is 14 MiB, not 74.
LAMBDA_PROFILE_ENV := CARGO_PROFILE_RELEASE_STRIP=symbols CARGO_PROFILE_RELEASE_DEBUG=false

build: venv ## Release build of the three Lambda functions for arm64 (cargo lambda; into target/lambda/)
	PATH="$(CURDIR)/.venv/bin:$$PATH" $(LAMBDA_PROFILE_ENV) $(CARGO) lambda build --release --arm64 -p settle-lambda

demo: build-cli ## 2,000 renewals through a stand-in payment gateway by a Python processor, then a redrive (scripts/demo.sh)
	scripts/demo.sh $(SETTLE_RELEASE)

run: demo ## Alias of demo

test: venv venv-sam browser ## Every check and test (fmt, clippy, unit, conformance, end-to-end, the dashboard in headless Chromium), with the AWS emulator
	@set -e; started=1; \
	  if [ -f .settle/emulator/pid ] && kill -0 "$$(cat .settle/emulator/pid)" 2>/dev/null; then started=; fi; \
	  eval "$$(infra/emulator.sh up)"; \
	  if [ -n "$$started" ]; then trap 'infra/emulator.sh down' EXIT; fi; \
	  $(MAKE) --no-print-directory test-steps

test-steps: # The steps of `make test`, in an environment that has the emulator's exports
	$(CARGO) fmt --all -- --check
	.venv/bin/cfn-lint template.yaml
	.venv/bin/python infra/check_template.py
	$(SAM) validate --lint --region us-east-1 --template template.yaml
	.venv/bin/python -m unittest -q infra/test_esm.py
	$(CARGO) clippy --all-targets -- -D warnings
	set -o pipefail; $(CARGO) test --workspace --no-fail-fast 2>&1 | python3 scripts/test_summary.py

# The dashboard's browser test (crates/settle-cli/tests/cli_ui.rs) drives
# headless Chromium through chromedriver: Debian's packages, installed as root.
browser: ## Install chromium and chromium-driver (Debian packages) if missing
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" != 0 ]; then echo "chromium and chromedriver are missing: install the Debian packages chromium and chromium-driver (as root)" >&2; exit 1; fi; \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; }

ui-screenshots: browser ## Refresh the dashboard's screenshots in docs/img (its browser test, keeping the PNGs)
	SETTLE_UI_SCREENSHOTS=$(CURDIR)/docs/img $(CARGO) test -p settle-cli --test cli_ui -- a_browser_operates_a_run_on_the_embedded_backend a_settling_run_is_followed_live

VENV_STAMP := .venv/.stamp-requirements

venv: $(VENV_STAMP) ## Python tooling (moto, cfn-lint, cargo-lambda) in .venv
$(VENV_STAMP): infra/requirements.txt
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/pip install --quiet --disable-pip-version-check -r infra/requirements.txt
	touch $@

SAM_STAMP := .venv-sam/.stamp-requirements
# No telemetry: the machine may have no network, and the template is ours.
SAM := SAM_CLI_TELEMETRY=0 .venv-sam/bin/sam

venv-sam: $(SAM_STAMP) ## AWS SAM CLI (sam validate, sam build) in .venv-sam
$(SAM_STAMP): infra/requirements-sam.txt
	test -x .venv-sam/bin/python || python3 -m venv .venv-sam
	.venv-sam/bin/pip install --quiet --disable-pip-version-check -r infra/requirements-sam.txt
	touch $@

emulator-up: venv ## Start the local AWS emulator with the default stack; prints export lines
	@infra/emulator.sh up

stack-up: venv ## The offline stack: the emulator plus the three functions under cargo lambda watch, fed by infra/esm.py; prints export lines
	@infra/emulator.sh up --deployed

emulator-down: ## Stop the local AWS emulator
	@infra/emulator.sh down

invoke-dispatcher: ## Invoke the dispatcher on infra/events/dispatcher-schedule.json (sam local: needs Docker)
	sam local invoke DispatcherFunction --event infra/events/dispatcher-schedule.json

invoke-worker: ## Invoke the worker on infra/events/worker-sqs.json (sam local: needs Docker)
	sam local invoke WorkerFunction --event infra/events/worker-sqs.json

invoke-reducer: ## Invoke the reducer on infra/events/reducer-sqs.json (sam local: needs Docker)
	sam local invoke ReducerFunction --event infra/events/reducer-sqs.json

deploy: venv venv-sam ## Build with SAM (cargo lambda) and deploy the stack to AWS, asking for its settings
	PATH="$(CURDIR)/.venv/bin:$(CURDIR)/.venv-sam/bin:$$PATH" $(LAMBDA_PROFILE_ENV) SAM_CLI_TELEMETRY=0 sam build --beta-features && SAM_CLI_TELEMETRY=0 sam deploy --guided

sam-build: venv venv-sam ## sam build --beta-features: the arm64 bootstraps of the stack's functions into .aws-sam/build (release builds; takes a while)
	PATH="$(CURDIR)/.venv/bin:$(CURDIR)/.venv-sam/bin:$$PATH" $(LAMBDA_PROFILE_ENV) SAM_CLI_TELEMETRY=0 sam build --beta-features

lint-template: venv venv-sam ## cfn-lint and sam validate --lint template.yaml, and check that it mirrors infra/stack.json (what the emulator and tests create)
	.venv/bin/cfn-lint template.yaml
	.venv/bin/python infra/check_template.py
	$(SAM) validate --lint --region us-east-1 --template template.yaml

cost: venv ## AWS cost per million items from the calls of 10,000 items on the emulator (COUNT=, RUNS=, COST_ARGS="--output-bytes 0 --log-bytes 0" to change; about 15-25 minutes)
	$(CARGO) build -p settle-cli
	@set -e; started=1; \
	  if [ -f .settle/emulator/pid ] && kill -0 "$$(cat .settle/emulator/pid)" 2>/dev/null; then started=; fi; \
	  eval "$$(infra/emulator.sh up)"; \
	  if [ -n "$$started" ]; then trap 'infra/emulator.sh down' EXIT; fi; \
	  python3 scripts/cost.py $${COUNT:-10000} --runs $${RUNS:-10} $(COST_ARGS)

fmt: ## Format the code
	$(CARGO) fmt --all

bench: build-cli ## Throughput: 1,000,000 items (10% permanent failures), durable, load included
	python3 scripts/bench.py 1000000 --processor scripted

bench-memory: build-cli ## Peak memory: 10,000,000 items (takes several minutes and ~4 GB of disk)
	python3 scripts/bench.py 10000000 --processor scripted

bench-node: ## Install the processor benchmarks' npm packages (BullMQ) into bench/node from its lock file
	cd bench/node && npm ci --no-audit --no-fund --loglevel=error

bench-jsonl: build-cli bench-node ## jsonl processor (Node) vs BullMQ on Redis: 100,000 items, 3 alternating repetitions
	scripts/bench_tools.sh redis-server
	python3 scripts/bench_processors.py jsonl --settle $(SETTLE_RELEASE)

bench-http: build-cli ## --http vs wrk (64 connections, 10 s) against the same Node keep-alive server: 100,000 items, 3 repetitions
	scripts/bench_tools.sh wrk
	python3 scripts/bench_processors.py http --settle $(SETTLE_RELEASE)

bench-exec: build-cli ## --exec (a process per item) vs GNU parallel, same command: 5,000 items, 3 repetitions
	scripts/bench_tools.sh parallel
	python3 scripts/bench_processors.py exec --settle $(SETTLE_RELEASE)

bench-flow: build-cli bench-node ## Flow control against a rate-limited API (scripts/flow_server.py): each processor kind with and without --rate vs GNU parallel and BullMQ, 10,000 items at 100/s (COUNT=, RATE=, FLOW_ARGS=--quick)
	scripts/bench_tools.sh redis-server parallel
	python3 scripts/bench_flow.py $${COUNT:-} --rate $${RATE:-100} --settle $(SETTLE_RELEASE) $(FLOW_ARGS)

soak: ## Deterministic fault simulation over many seeds (SEEDS=1000 by default, 300 items each); SEED=N replays one
	SETTLE_SIM_SEEDS=$${SEEDS:-1000} SETTLE_SIM_SEED=$${SEED:-} $(CARGO) test --release -p settle-embedded --test simulation faults_never_lose -- --nocapture

clean: ## Remove build output, benchmark data and the local database
	$(CARGO) clean
	rm -rf bench-data .settle

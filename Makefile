# The README's contract: `make demo` and `make test`. Each does its own set-up
# (scripts/bootstrap.sh creates .venv/ if missing, reuses it if up to date).

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# Cut TensorFlow's C++ log noise in test and demo runs.
export TF_CPP_MIN_LOG_LEVEL ?= 2

PYTEST_ARGS ?=
# The demo trains FedAvg whose server learning rate is learned by Federated
# AD (research/hypergradient_fedavg/main.py), from a bad start, on the
# embedded digits; override with e.g. `make demo DEMO_ARGS="--fad_mode=reverse"`.
DEMO_OUT ?= out/demo
DEMO_ARGS ?= --rounds=40 --server_lr=0.1
BAZEL ?= bazel
BAZEL_ARGS ?=

.PHONY: help venv test demo demo-workers bench bench-core bench-baffle \
	bench-scaling bench-stages bench-tls certs lock bazel bazel-setup bazel-test clean

help:
	@echo "make demo        run the main job (research/hypergradient_fedavg/main.py) on embedded data"
	@echo "                 (outputs in $(DEMO_OUT); extra flags via DEMO_ARGS=...)"
	@echo "make test        run the whole pytest suite"
	@echo "make demo-workers  the demo with each round split over 2 local TFF workers"
	@echo "make certs       a throwaway CA and certificates for TLS workers (WORKER_HOSTS=h1,h2)"
	@echo "make bench       all benchmarks (bench-core, bench-baffle, bench-scaling, bench-stages, bench-tls)"
	@echo "make bazel-test  install Bazel if missing and run 'bazel test //...'"
	@echo "make lock        recompile requirements/requirements.lock"
	@echo "make clean       remove .venv, .bazel-local and Bazel outputs"

venv:
	@scripts/bootstrap.sh

# pytest-xdist: one worker process per core (at most 4), each importing TFF
# once, and idle workers take tests queued for busy ones (worksteal): one
# process kept one core of two busy (23 min; 11 min with 2 workers on the
# same machine). PYTEST_ARGS="-n 0" runs the suite in one process.
test: venv
	$(PY) -m pytest -n auto --maxprocesses=4 --dist worksteal $(PYTEST_ARGS)

demo: venv
	$(PY) -m research.hypergradient_fedavg.main --output_dir=$(DEMO_OUT) $(DEMO_ARGS)

# The demo on 2 local TFF workers, started in a private network namespace
# (tff_fad/local_workers.py) and stopped when the run ends. Running it again
# resumes from the last saved round.
demo-workers: venv
	$(PY) -m tff_fad.local_workers run --num_workers=2 -- \
	    $(PY) -m research.hypergradient_fedavg.main \
	    --output_dir=$(DEMO_OUT)_workers $(DEMO_ARGS)

# A throwaway CA, a worker and a driver certificate for a test cluster of
# workers behind TLS fronts (python -m tff_fad.local_workers serve).
CERTS_DIR ?= certs
WORKER_HOSTS ?= 127.0.0.1,localhost
certs: venv
	$(PY) -m tff_fad.worker_tls make-certs --out_dir $(CERTS_DIR) \
	    --worker_hosts $(WORKER_HOSTS)

# Long-running measurements (results are reported in the README).
bench: bench-core bench-baffle bench-scaling bench-stages bench-tls

bench-core: venv
	$(PY) -m benchmarks.core_modes --repeats=21 \
	    --output=benchmarks/results/core_modes.json

bench-baffle: venv
	$(PY) -m benchmarks.baffle_client \
	    --output=benchmarks/results/baffle_client.json

bench-scaling: venv
	$(PY) -m benchmarks.scaling --output=benchmarks/results/scaling.json

# Programs of several aggregation stages on 1 vs 2 pinned workers.
bench-stages: venv
	$(PY) -m benchmarks.scaling --clients_per_round=100,1000 --repeats=5 \
	    --contexts=local,1_worker_pinned,2_workers_pinned,2_workers_pinned_tls \
	    --algorithms=tff_fed_avg,hypergradient_fed_avg,hypergradient_fed_avg_reverse,fed_avg_2_rounds_gradient,client_tensors_only,client_datasets_only \
	    --output=benchmarks/results/scaling_stages.json

# What TLS between the driver and its workers costs a round: 2 pinned workers
# with and without TLS fronts, side by side (tls_over_plaintext_2_pinned_workers).
bench-tls: venv
	$(PY) -m benchmarks.scaling --clients_per_round=100 --repeats=15 \
	    --contexts=local,2_workers_pinned,2_workers_pinned_tls \
	    --algorithms=tff_fed_avg,hypergradient_fed_avg,hypergradient_fed_avg_reverse,fed_avg_2_rounds_gradient,client_tensors_only,client_datasets_only \
	    --output=benchmarks/results/scaling_tls.json

# Recompile the lock (uv is installed in .venv by the bootstrap). Relative
# paths keep the command recorded in the lock's header reproducible. uv also
# applies pyproject.toml's [tool.uv] override (the same jax/jaxlib pins;
# tests/install_test.py checks they agree), annotated `--override (workspace)`.
lock: venv
	$(VENV)/bin/uv pip compile requirements/requirements.in \
	    --override requirements/overrides.txt --python-version 3.11 \
	    -o requirements/requirements.lock

# Debian/Ubuntu's bazel-bootstrap (Bazel 4.2.3) works offline with the stub
# repositories in third_party/bazel.
bazel:
	@if ! command -v $(BAZEL) >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "Installing Bazel (apt-get install bazel-bootstrap)"; \
	  $$SUDO apt-get update && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y bazel-bootstrap; \
	fi

# Machine-specific Bazel files (the Python toolchain pointing at .venv).
bazel-setup: venv
	@scripts/bazel_setup.sh

bazel-test: bazel bazel-setup
	$(BAZEL) test //... $(BAZEL_ARGS)

clean:
	-command -v $(BAZEL) >/dev/null && [ -f WORKSPACE ] && $(BAZEL) clean --expunge
	rm -rf $(VENV) .bazel-local .pytest_cache

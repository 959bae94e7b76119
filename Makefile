# Two entry points, both doing their own set-up on a fresh machine:
#   make demo   dynamollm against singlepool on the embedded synthetic conversation workload, minimising
#               energy (the default), then cost
#   make demo-live  the whole product as processes on loopback: three simulated GPU nodes, the controller and
#               the router serving the conversation hour 12x compressed (about 12 minutes in all), dynamollm
#               against singlepool, energy read from the nodes' counters beside the simulator's prediction
#   make test   lint, type checks, import layering, wire-contract freshness, tests
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NATIVE := $(VENV)/.native

.PHONY: demo demo-live test lint typecheck layering proto-check pytest bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The simulator's engine and physics compiled with mypyc (tools/build_native.py): about 1.7x faster runs,
# the same results. Without a C compiler the build fails with its reason and the simulator runs as Python.
$(NATIVE): $(STAMP) agent/sim/engine_core.py agent/sim/physics/model.py tools/build_native.py
	-$(BIN)/python tools/build_native.py
	touch $(NATIVE)

demo: $(NATIVE)
	$(BIN)/dctl simulate --trace synthetic:conversation --compare dynamollm --out demo-out
	$(BIN)/dctl simulate --trace synthetic:conversation --compare dynamollm --objective cost --out demo-out/cost

demo-live: $(NATIVE)
	$(BIN)/python tools/demo_live.py --out demo-live-out

test: lint typecheck layering proto-check pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

layering: $(STAMP)
	$(BIN)/python tools/check_layering.py

proto-check: $(STAMP)
	$(BIN)/python tools/gen_proto.py --check

pytest: $(NATIVE)
	$(BIN)/python -m pytest -q

bench: $(NATIVE)
	$(BIN)/python tools/bench_sim.py

clean:
	rm -rf $(VENV) demo-out demo-live-out .mypy_cache .ruff_cache .pytest_cache

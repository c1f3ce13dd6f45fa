# The two commands of the README:
#   make demo  - install everything, build the guest image, run a VM and show what its agent reports
#   make test  - install everything, build the guest image, run the whole test suite (lint, types, coverage)
.PHONY: deps image demo test unit proto bench

deps:
	./scripts/install-deps

image: deps
	.venv/bin/cocoon image build

demo: image
	.venv/bin/cocoon demo

test: image
	.venv/bin/python -m pytest -q tests --cov=cocoon --cov-report=term --cov-fail-under=75

unit: deps
	.venv/bin/python -m pytest -q tests/unit

proto:
	./scripts/genproto

bench: image
	.venv/bin/python benchmarks/run_all.py

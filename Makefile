# The two commands of the README: `make demo` and `make test`. Both build .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast typecheck venv clean world study browser mutation

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	# DeepSpeed (the ZeRO tests run it on CPUs) builds against the torch above: no build isolation, or pip
	# would fetch an unpinned multi-GB torch to build it with.
	$(BIN)/python -m pip install --quiet setuptools wheel
	$(BIN)/python -m pip install --quiet --no-build-isolation deepspeed==0.19.8
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/expertune demo --out outputs/demo

# Rebuild the committed world model from nothing (about half an hour on 2 CPU cores: docs/benchmarks.md), then check it.
world: $(STAMP)
	$(BIN)/expertune world build src/expertune/world/pretrained

# The equal-compute study of experts against one model (docs/quality.md); STUDY_ARGS=--quick for minutes.
study: $(STAMP)
	$(BIN)/python bench/expert_study.py $(STUDY_ARGS)

# The UI's browser test drives Debian's chromium through its chromedriver: installed here when we are root with
# apt-get, else `make test` stops with one line naming the packages.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }; \
	else echo "make test needs the Debian packages chromium and chromium-driver: apt-get install chromium chromium-driver (as root)"; exit 1; fi

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

typecheck: $(STAMP)
	$(BIN)/python -m mypy

# The inner loop: unit tests only (no training runs, no launched processes), well under a minute.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

# Mutation testing of the pure core against its unit tests ([tool.mutmut] in pyproject.toml; docs/testing.md):
# one module at a time on one core, then the score per module, the mutants not killed, and last the total score.
MUTATION_MODULES := experts schedule mixture resolution expert_format objective.loss objective.weighting config.plan
mutation: $(STAMP)
	rm -rf mutants
	for module in $(MUTATION_MODULES); do \
		OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children 1 "expertune.$$module.*" > /dev/null 2>&1 \
			|| { echo "mutmut failed on $$module: run '$(BIN)/mutmut run expertune.$$module.*' to see why"; exit 1; }; \
	done
	$(BIN)/python bench/mutation_score.py

clean:
	rm -rf $(VENV) outputs .pytest_cache mutants

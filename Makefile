# The two set-up commands are `make demo` and `make test`; both work from a clean clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.srntt-installed
# A CPU build of torch lies on this machine kind's disk; a GPU machine gets the default build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
EXT_SOURCES := $(wildcard setup.py pyproject.toml csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*)

.PHONY: setup demo test bench lint cuda-check asan-test gpu-compile-check gpu-check clean

setup: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(VENV)/bin/python $(EXT_SOURCES)
	$(PY) -m pip install -q --upgrade pip setuptools wheel numpy
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench,triton,lint]"
	$(PY) -c "import srntt_core; print(srntt_core.build_info())"
	touch $@

demo: $(STAMP)
	$(PY) -m srntt_core demo
	$(PY) -m srntt_core swap-demo -o out/swap_demo.png

# tests/test_cuda_backend.py::test_cuda_check_script compiles the CUDA sources with nvcc when present.
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider benchmarks --benchmark-only \
		--benchmark-json=benchmarks/results/$$($(PY) -m srntt_core.cli.machine)/bench.json

lint: $(STAMP)
	$(VENV)/bin/ruff check srntt_core kernels tests benchmarks setup.py

cuda-check:
	bash scripts/cuda_check.sh

# The C++-backend tests under AddressSanitizer + UBSan (not part of `make test`; `DEBUG=1 make
# asan-test` builds at -O0 -g). The sanitized srntt_core._C is built into a copy of the package
# under build/asan, which PYTHONPATH puts first; the Python host needs libasan preloaded (and
# libstdc++, for ASan's C++-exception interceptor). Reports: build/asan/report.<pid>.
ASAN_DIR := build/asan
ASAN_TESTS ?= tests/test_cpu_kernels.py tests/test_bounds.py tests/test_hardening_props.py \
	tests/test_bad_input.py tests/test_opcheck.py tests/test_feature_swap.py tests/test_patch_match.py
asan-test: $(STAMP)
	rm -rf $(ASAN_DIR) && mkdir -p $(ASAN_DIR)/lib
	cp -r srntt_core $(ASAN_DIR)/lib/ && rm -f $(ASAN_DIR)/lib/srntt_core/_C*.so
	CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" \
	LDFLAGS="-fsanitize=address,undefined" SRNTT_NO_CUDA=1 \
		$(PY) setup.py -q build_ext --build-lib $(ASAN_DIR)/lib --build-temp $(ASAN_DIR)/tmp
	export PYTHONPATH=$(ASAN_DIR)/lib SRNTT_BACKEND=cpu \
		LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
		ASAN_OPTIONS=detect_leaks=0:log_path=$(CURDIR)/$(ASAN_DIR)/report \
		UBSAN_OPTIONS=print_stacktrace=1:log_path=$(CURDIR)/$(ASAN_DIR)/report && \
	$(PY) -P -c "import srntt_core._C as c; assert '$(ASAN_DIR)' in c.__file__, c.__file__" && \
	$(VENV)/bin/pytest -q -p no:cacheprovider -x $(ASAN_TESTS) -k "not torch and not compile and not first_call" \
		|| { cat $(ASAN_DIR)/report.* 2>/dev/null; exit 1; }

# Every Triton and CUDA kernel compiled for sm_80 and sm_90 without a GPU: registers, spills, shared
# memory, tensor-core instructions -> build/gpu-compile-check.json (minutes; a subset is in `make test`).
gpu-compile-check: $(STAMP)
	$(PY) scripts/gpu_compile_check.py

# On a machine with a GPU: build, cuda/triton tests, memcheck, benchmarks, predictions vs measurements.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build *.egg-info srntt_core/_C*.so

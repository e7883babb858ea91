# Two set-up commands (README): `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

DEMO := runs/demo

.PHONY: install test lint demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	# pinned CPU build, taken from local disk on the development machines; users with a GPU
	# install their own torch first and skip this target
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"

lint:
	$(BIN)/ruff check denseflow tests
	$(BIN)/ruff format --check denseflow tests

test: install lint
	$(BIN)/python -m pytest -q

# train -> evaluate -> sample on the bundled Fashion-MNIST subset (minutes on 2 CPU cores, offline)
demo: install
	rm -rf $(DEMO)
	$(BIN)/denseflow train --preset demo --out $(DEMO)
	@echo "IWBO-10 on the first 2,000 test images (a fixed subset: minutes on either data set)"
	$(BIN)/denseflow evaluate --checkpoint $(DEMO)/final.pt --k 10 --limit 2000 --json $(DEMO)/test_iwbo10.json
	$(BIN)/denseflow sample --checkpoint $(DEMO)/final.pt --num 64 --temperature 0.7 --out $(DEMO)/samples_t0.7.png
	$(BIN)/denseflow sample --checkpoint $(DEMO)/final.pt --num 64 --out $(DEMO)/samples_t1.0.png
	@echo "the published model (docs/model_card.md, 300,000 training images) for comparison"
	$(BIN)/denseflow sample --checkpoint fashion-mnist --num 64 --temperature 0.7 --out $(DEMO)/published_t0.7.png
	@echo "demo done: samples in $(DEMO)/samples_t0.7.png and $(DEMO)/samples_t1.0.png" \
	      "(the published model's in $(DEMO)/published_t0.7.png)," \
	      "training-time grids in $(DEMO)/samples/, metrics in $(DEMO)/metrics.jsonl"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

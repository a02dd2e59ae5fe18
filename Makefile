# Two commands: `make demo` (install, fine-tune SmolLM2-135M-Instruct, generate) and `make test`.
PYTHON ?= python3
RUN_DIR ?= runs/demo
PROMPT ?= Who are you?

.PHONY: install demo test test-all lint

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

demo: install
	rm -rf $(RUN_DIR)
	$(PYTHON) -m mlx_ft sft --model smollm2-135m --data scripts/data/sft_example \
		--steps 30 --batch-size 4 --max-length 256 --learning-rate 2e-4 --eval-every 10 \
		--run-dir $(RUN_DIR) --sample-prompt "$(PROMPT)"
	$(PYTHON) -m mlx_lm generate --model "$$($(PYTHON) -m converters import-default)" \
		--adapter-path $(RUN_DIR)/adapters --prompt "$(PROMPT)" --max-tokens 48

test: install
	$(PYTHON) -m pytest -q

test-all: install
	$(PYTHON) -m pytest -q -m ""

lint:
	$(PYTHON) -m ruff check .

# `make demo` and `make test` each set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# pinned so pip picks the CPU wheel here (and the CUDA build on a GPU machine); installed before the rest
TORCH  ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/pipeline tiny-model --output_dir runs/demo/tiny-model --hidden_size 128 --num_layers 4 --intermediate_size 512
	$(BIN)/pipeline synthetic-data --output_dir runs/demo/data --num_problems 520 --responses_per_problem 2
	$(BIN)/pipeline sft --config recipes/demo/sft.yaml
	$(BIN)/pipeline generate --model runs/demo/sft --prompts_from runs/demo/data/sft_eval.parquet --num_prompts 3
	$(BIN)/pipeline prepare --data_path runs/demo/data/coderl_train.parquet --output_dir runs/demo/prepared \
	    --tokenizer_name_or_path runs/demo/sft --max_length 256 --eval_fraction 0 --overwrite true
	rm -rf runs/demo/prepared_ref_logp
	$(BIN)/pipeline logp --data_path runs/demo/prepared --model_name_or_path runs/demo/sft --max_length 256 --splits train
	$(BIN)/pipeline ips --config recipes/demo/ips.yaml
	$(BIN)/pipeline generate --model runs/demo/sft --synthetic_pass_rate 520
	$(BIN)/pipeline generate --model runs/demo/ips --synthetic_pass_rate 520

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf runs .pytest_cache .ruff_cache

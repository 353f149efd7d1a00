# Two commands: `make demo` and `make test`. Both set up .venv when it is missing or stale.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo-out

.PHONY: install demo test lint typecheck unit browser corpora clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==26.3"
	$(BIN)/python -m pip install --quiet -e ".[test,mlir]"
	mkdir -p $(VENV)/typecheck && ln -sfn $(CURDIR) $(VENV)/typecheck/dsv3c
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh $(BIN) $(DEMO_OUT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	cd $(VENV)/typecheck && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p dsv3c

# The HTML diff report is checked in headless Chromium (Debian's package; browser downloads do not work here).
browser:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		echo "chromium not installed: the HTML report test will be skipped"; }

# The training tests and `dsv3c train --prepare` read human-written text from Debian packages (offline corpora).
corpora:
	@test -d /usr/share/doc/python3.11/html/_sources || { command -v apt-get >/dev/null && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-doc dict-gcide >/dev/null) || \
		echo "python3.11-doc not installed: the training tests will be skipped"; }

unit: $(STAMP) browser corpora
	$(BIN)/python -m pytest

test: lint typecheck unit

clean:
	rm -rf $(VENV) $(DEMO_OUT) build *.egg-info

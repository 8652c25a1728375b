# Two commands for a newcomer: `make demo` and `make test`. Both install what they need.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WEB := src/streamplane/web
VENDOR := $(WEB)/static/vendor

.PHONY: install demo test lint bench clean system

# The steering ranking (every playback request runs it) compiled with mypyc: about 1.5x the
# interpreted speed. rank.py stays the source; the package sets the extension aside when it
# was built from another rank.py (rank.compiled holds the hash built), and without a C
# compiler the source runs. See src/streamplane/steering/_build.py.
STEERING := src/streamplane/steering
RANK_STAMP := $(STEERING)/rank.compiled

# Debian packages the tests and benches drive as real peers: Chromium (the browser player's
# tests), strace (the zero-copy proof), nginx and wrk (the edge benchmark). Installed once when
# missing and this shell may run apt-get as root; otherwise the tests that need them skip and
# say why.
SYSTEM_TOOLS := chromium:chromium strace:strace nginx:nginx-light wrk:wrk

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): pyproject.toml $(VENDOR)/hls.min.mjs $(VENDOR)/dash.all.min.js $(VENDOR)/shaka-player.compiled.js | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The browser player's JavaScript: hls.js and dash.js from npm (pinned by package-lock.json) into
# static/vendor/ (dash.js's licence renamed beside hls.js's), and Shaka Player's compiled build,
# which the tests play signed titles with as a third player (its licence renamed likewise).
$(VENDOR)/hls.min.mjs $(VENDOR)/dash.all.min.js $(VENDOR)/shaka-player.compiled.js &: $(WEB)/package.json $(WEB)/package-lock.json
	@command -v npm >/dev/null || { echo "npm not found: install Node.js 20+ (the player's hls.js and dash.js come from npm)"; exit 1; }
	cd $(WEB) && npm ci --no-audit --no-fund --loglevel=error
	mkdir -p $(VENDOR)
	cp $(WEB)/node_modules/hls.js/dist/hls.min.mjs $(WEB)/node_modules/hls.js/LICENSE $(VENDOR)/
	cp $(WEB)/node_modules/dashjs/dist/modern/esm/dash.all.min.js \
	  $(WEB)/node_modules/dashjs/dist/modern/esm/dash.all.min.js.LICENSE.txt $(VENDOR)/
	cp $(WEB)/node_modules/dashjs/LICENSE.md $(VENDOR)/LICENSE.dashjs.md
	cp $(WEB)/node_modules/shaka-player/dist/shaka-player.compiled.js $(VENDOR)/
	cp $(WEB)/node_modules/shaka-player/LICENSE $(VENDOR)/LICENSE.shaka-player
	touch $(VENDOR)/hls.min.mjs $(VENDOR)/dash.all.min.js $(VENDOR)/shaka-player.compiled.js

$(VENV)/.system: | $(BIN)/python
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian packages:$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	    || echo "warning: could not install$$missing; the tests that need them will skip"; \
	else echo "note: missing$$missing (Debian packages); the tests that need them will skip"; fi
	@touch $@

system: $(VENV)/.system

$(RANK_STAMP): $(STEERING)/rank.py $(STAMP)
	@rm -f $(STEERING)/rank.*.so $(STEERING)/rank__mypyc.*.so $@
	@mkdir -p build
	@if (cd src && ../$(BIN)/mypyc streamplane/steering/rank.py) >build/mypyc.log 2>&1; then \
	  sha256sum $(STEERING)/rank.py | cut -d' ' -f1 >$@; echo "compiled the steering ranking (mypyc)"; \
	else rm -f $(STEERING)/rank.*.so $(STEERING)/rank__mypyc.*.so; touch $@; \
	  echo "note: could not compile the steering ranking (build/mypyc.log); it runs interpreted"; fi
	@rm -rf src/build

install: $(STAMP) $(VENV)/.system $(RANK_STAMP)

demo: install
	$(BIN)/streamplane demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

# The suite mostly waits on real servers, browsers and ffmpeg: two workers (pytest-xdist) take
# it in about half the time on two cores; a test's own fixtures are private to it, so any two
# tests may run side by side, except the browser tests, which share one worker (their
# xdist_group, tests/conftest.py). `make test TEST_WORKERS=0` runs it in one process.
TEST_WORKERS ?= 2

test: install lint
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadgroup

bench: install
	$(BIN)/python bench/shots.py
	$(BIN)/python bench/encode.py --sources real-mix bench-mix demo-mix
	$(BIN)/python bench/placement.py --clusters reference large mixed --days 30 --warmup 30 --seed 7
	$(BIN)/python bench/tokens.py
	$(BIN)/python bench/cache.py
	$(BIN)/python bench/edge.py
	$(BIN)/python bench/steering.py
	$(BIN)/python bench/playback.py
	$(BIN)/python bench/telemetry.py
	$(BIN)/python bench/abr.py
	$(BIN)/python bench/realtime_redis.py

clean:
	rm -rf catalog build .pytest_cache .mypy_cache .ruff_cache src/build
	rm -f $(RANK_STAMP) $(STEERING)/rank.*.so $(STEERING)/rank__mypyc.*.so

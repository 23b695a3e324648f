# Query Optimization Workbook — `make run` executes the workbook, `make test` tests it.
# Everything runs from .venv (created here, re-installed only when requirements.lock changes).
PYTHON ?= python3
# VENV: the Python environment everything runs in. The default, .venv, is made here from requirements.lock.
# An environment made elsewhere is used as it is, and nothing is installed into it: an activated conda
# environment named qo-workbook (`conda env create -f environment.yml`) is detected, or pass any other with
# `make run VENV=$CONDA_PREFIX` (or a venv's folder). make checks that it holds the lock's pins
# (helpers/envcheck.py) and puts the checkout on PYTHONPATH instead of writing a .pth into it.
ifeq ($(origin VENV),undefined)
VENV := $(if $(and $(CONDA_PREFIX),$(filter qo-workbook,$(CONDA_DEFAULT_ENV))),$(CONDA_PREFIX),.venv)
endif
EXTERNAL := $(filter-out .venv $(CURDIR)/.venv,$(VENV))
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ROOTFLAG = $(if $(filter 0,$(VENV_UID)),--allow-root,)
PG15_BIN ?= /usr/lib/postgresql/15/bin
export PLOOMBER_STATS_ENABLED := false
NBMAKE := --nbmake --nbmake-timeout=300
# chapters whose behaviour depends on the server's major version (plans, transaction_timeout, DDL locks, RETURNING old/new)
VERSIONED := notebooks/02a_reading_plans_and_indexes.ipynb notebooks/02b_joins_statistics_and_query_shapes.ipynb notebooks/03a_transactions_and_lost_updates.ipynb notebooks/03b_deadlocks_and_lock_conflicts.ipynb notebooks/06_zero_downtime_migrations.ipynb notebooks/07a_reports_in_sql_and_orm.ipynb notebooks/07b_bulk_writes_and_big_reads.ipynb

.PHONY: help venv run lab test test-unit test-browser test-pg15 lint db-start db-stop db-status db-log reset seed bench clean distclean lock

help:
	@echo "make run        execute every notebook into output/ (starts the embedded PostgreSQL; CHAPTERS=\"00 02\": only those)"
	@echo "make test       pytest on helpers + nbmake on every notebook (SCALE=small|large: the notebooks at that scale)"
	@echo "make test-unit  the pure-code tests only: seconds, no database server (none is started)"
	@echo "make lab        JupyterLab on notebooks/ with the database ready (PORT=8888 IP=0.0.0.0 for a remote machine)"
	@echo "make test-browser  chapters run in JupyterLab in headless chromium (needs Debian's chromium)"
	@echo "make db-start | db-stop | db-status | db-log | reset | seed | bench | lint | clean"

# The venv belongs to one checkout path and one user: its qo_workbook.pth, its scripts' #! lines and
# files name them. The stamp records both; a copied or moved checkout (cp -a), or another user's copy,
# differs and rebuilds the venv. Read with $(file <) when make parses this: no process when unchanged.
VENV_UID := $(shell id -u)
VENV_ID  := $(CURDIR) uid=$(VENV_UID)
ifneq ($(if $(wildcard $(STAMP)),$(file < $(STAMP))),$(VENV_ID))
VENV_ELSEWHERE := FORCE
endif
.PHONY: FORCE
FORCE:

ifdef EXTERNAL
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
venv:
	@test -x $(PY) || { echo 'VENV=$(VENV): no $(PY) there (for conda: VENV=$$CONDA_PREFIX, in the activated environment)'; exit 1; }
	@$(PY) helpers/envcheck.py requirements.lock
else
venv: $(STAMP)
endif
$(STAMP): requirements.lock pyproject.toml $(VENV_ELSEWHERE)
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required, found " + sys.version.split()[0]'
	@# built for another checkout path or user (or half built): start afresh
	@if [ -e $(VENV) ] && { [ "$$(stat -c %u $(VENV))" != "$(VENV_UID)" ] || \
	    [ "$$(cat $(VENV)/lib/python3*/site-packages/qo_workbook.pth 2>/dev/null)" != "$(CURDIR)" ]; }; then \
	  echo "$(VENV) was built for another checkout path or user: rebuilding it for $(VENV_ID)"; \
	  rm -rf $(VENV) || { echo "cannot remove $(VENV): remove it yourself, then run make again"; exit 1; }; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	@# the checkout itself on sys.path (so the kernel imports `helpers` from any folder), no build step
	$(PY) -c 'import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()["purelib"], "qo_workbook.pth").write_text(str(pathlib.Path.cwd()) + "\n")'
	@echo '$(VENV_ID)' > $(STAMP)

# make run [CHAPTERS="00 02"]: every chapter, or those (by number), executed into output/
run: venv db-start
	$(PY) -m helpers seed --if-needed
	$(PY) -m helpers run $(CHAPTERS)

# make lab [PORT=8888] [IP=0.0.0.0]: Jupyter prints the URL with its token (the next free port if PORT is taken);
# on an address other than localhost (a remote training machine) no browser is started here
PORT ?= 8888
IP   ?= 127.0.0.1
lab: venv db-start
	$(PY) -m helpers seed --if-needed
	$(PY) -m jupyter lab --notebook-dir=notebooks --ServerApp.ip=$(IP) --ServerApp.port=$(PORT) \
	  $(if $(filter 127.0.0.1 localhost,$(IP)),,--no-browser) $(ROOTFLAG)

# JupyterLab in headless chromium runs chapters 00 and 08 (tests/browser). Installs nothing: CI runs
# .ci/browser-setup for Debian's chromium. Screenshots and logs go to BROWSER_DIR (default: a new temp folder).
CHROMIUM ?= /usr/bin/chromium
test-browser: venv db-start
	@test -x $(CHROMIUM) || { echo "make test-browser: no chromium at $(CHROMIUM) (as root: .ci/browser-setup, or apt-get install chromium)"; exit 1; }
	@$(PY) -c 'import playwright, ipywidgets' 2>/dev/null || { echo "make test-browser: playwright or ipywidgets missing from $(VENV) (make venv installs requirements.lock)"; exit 1; }
	$(PY) -m helpers seed --if-needed
	WORKBOOK_CHROMIUM=$(CHROMIUM) $(if $(BROWSER_DIR),WORKBOOK_BROWSER_DIR=$(BROWSER_DIR)) $(PY) -m pytest -m browser -s tests/browser

# make test SCALE=small|large: every notebook at that scale, seeded at that scale first (the helper tests
# do not depend on the scale and run only without SCALE, or with SCALE=ci); a chapter may take minutes there
TEST_SCALE := $(if $(SCALE),WORKBOOK_SCALE=$(SCALE),)
TEST_NBMAKE := $(if $(filter small large,$(or $(SCALE),$(WORKBOOK_SCALE))),--nbmake --nbmake-timeout=1200,$(NBMAKE))

test: venv db-start
	$(TEST_SCALE) $(PY) -m helpers seed --if-needed
	$(TEST_SCALE) $(PY) -m pytest $(if $(filter-out ci,$(or $(SCALE),$(WORKBOOK_SCALE))),,tests) notebooks $(TEST_NBMAKE) --durations=15

# the unit lane: tests marked `unit` (pure code, static checks), with DATABASE_URL on a closed port so that
# nothing starts the embedded server and a test that reaches for a database fails instead of waiting
UNIT_DB := postgresql+psycopg://unit:unit@127.0.0.1:9/no_server_in_the_unit_lane
test-unit: venv
	DATABASE_URL=$(UNIT_DB) WORKBOOK_UNIT_LANE=1 $(PY) -m pytest -p no:cacheprovider -m unit tests -q

# the version-specific chapters and tests once more on PostgreSQL 15 (Debian's postgresql-15)
test-pg15: venv
	@test -x $(PG15_BIN)/postgres || { echo "no PostgreSQL 15 server in $(PG15_BIN) (apt-get install postgresql-15)"; exit 1; }
	WORKBOOK_PG_BIN=$(PG15_BIN) $(PY) -m helpers db start
	WORKBOOK_PG_BIN=$(PG15_BIN) $(PY) -m pytest tests/test_server.py tests/test_seed.py tests/test_plans.py tests/test_migrations.py $(VERSIONED) $(NBMAKE)
	WORKBOOK_PG_BIN=$(PG15_BIN) $(PY) -m helpers db stop

lint: venv
	$(PY) -m ruff check helpers tests notebooks migrations
	$(PY) -m ruff format --check helpers tests migrations

db-start: venv
	$(PY) -m helpers db start
db-stop: venv
	$(PY) -m helpers db stop
db-status: venv
	$(PY) -m helpers db status
db-log: venv
	@$(PY) -m helpers db log
seed: venv
	$(PY) -m helpers seed $(if $(SCALE),--scale $(SCALE),)
reset: venv
	$(PY) -m helpers reset $(if $(SCALE),--scale $(SCALE),)
# the bench's record goes to bench-output/, never output/: only `make run` writes output/
bench: venv
	WORKBOOK_OUTPUT=$(CURDIR)/bench-output $(PY) -m helpers bench seed --scale $(or $(SCALE),ci)

lock: venv
	$(PY) -m pip install --quiet -r requirements.in
	{ echo "# The exact, tested set that make and CI install. Regenerate with \`make lock\` after editing requirements.in."; \
	  $(PY) -m pip list --format=freeze --exclude-editable --exclude pip; } > requirements.lock
	$(PY) -m helpers lock-env
	@# every pin must install on the oldest Python we support (3.11.0), not just on this one
	grep -v '^#' requirements.lock > $(VENV)/lock-check.txt
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11.0 -d $(VENV)/lock-check -r $(VENV)/lock-check.txt

clean:
	rm -rf output .pytest_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	-$(PY) -m helpers db stop
	rm -rf .venv .pgstate

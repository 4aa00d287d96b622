# Access Tunnel: set-up, demo, tests. Every target installs what it needs on a fresh Debian
# machine that has python3 (3.11 or newer) and make; see README.md.
#
#   make demo        groundcontrol on 127.0.0.1:2222 + a local agent "demo" (foreground)
#   make demo-stop   stop what an earlier 'make demo' left running
#   make test        the test suite (PYTEST_ARGS='-k relay -x' to pass options to pytest)
#   make lint        ruff check + ruff format --check + mypy (tests/test_static.py runs them too)

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
# The system-package step must run before the venv is built: keep prerequisites in order.
.NOTPARALLEL:

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Written after a successful install; re-install when the package metadata or pins change.
STAMP := $(VENV)/.access-tunnel-installed
PYTEST_ARGS ?=

# "command=Debian package" for the programs each goal runs. A command counts as present when
# it is on PATH, in /usr/sbin or (initdb, pg_ctl: Debian keeps them off PATH) in
# /usr/lib/postgresql/*/bin; the PostgreSQL store tests skip without the server binaries.
DEMO_SYSDEPS := ssh=openssh-client ssh-keygen=openssh-client
TEST_SYSDEPS := $(DEMO_SYSDEPS) scp=openssh-client sftp=openssh-client sshd=openssh-server \
	rsync=rsync tmux=tmux initdb=postgresql pg_ctl=postgresql tinyproxy=tinyproxy tor=tor \
	ip=iproute2 sshfs=sshfs Xvfb=xvfb xdpyinfo=x11-utils xauth=xauth curl=curl vim=vim \
	openssl=openssl faketime=faketime \
	gcc=gcc /usr/include/openssl/ssl.h=libssl-dev /usr/include/zlib.h=zlib1g-dev
# A newer OpenSSH client than Debian 12's 9.2 (tests/e2e/test_new_openssh.py: what an operator
# with a current laptop's OpenSSH gets), built from Debian's pool once and kept here.
NEW_SSH_DIR := .cache/openssh-client

# $(call sysdeps,PAIRS): install the Debian packages for missing commands (and python3-venv if
# the venv cannot be made yet) with one apt-get update; without root, name them and fail.
# A pair whose left side is an absolute path (a header) counts as present when the file exists.
# policy-rc.d keeps the post-install scripts from starting a system sshd on port 22 and a
# PostgreSQL cluster: the tests start their own, on loopback.
define sysdeps
missing=""; \
for pair in $(1); do \
	cmd=$${pair%%=*}; pkg=$${pair#*=}; \
	if [ "$${cmd#/}" != "$$cmd" ]; then [ -e "$$cmd" ] || missing="$$missing $$pkg"; continue; fi; \
	command -v "$$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$$cmd" ] \
		|| compgen -G "/usr/lib/postgresql/*/bin/$$cmd" >/dev/null || missing="$$missing $$pkg"; \
done; \
if [ ! -x $(VENV)/bin/pip ] && ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
	missing="$$missing python3-venv"; \
fi; \
missing=$$(printf '%s\n' $$missing | sort -u | xargs); \
if [ -n "$$missing" ]; then \
	if [ "$$(id -u)" != 0 ]; then \
		echo "error: missing Debian packages: $$missing" >&2; \
		echo "       install them (sudo apt-get install -y $$missing) or run make as root" >&2; \
		exit 1; \
	fi; \
	echo "installing Debian packages: $$missing"; \
	policy=""; \
	if [ ! -e /usr/sbin/policy-rc.d ]; then \
		printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; \
		policy=/usr/sbin/policy-rc.d; \
	fi; \
	rc=0; \
	{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; } \
		|| rc=$$?; \
	if [ -n "$$policy" ]; then rm -f "$$policy"; fi; \
	if [ $$rc != 0 ]; then echo "error: apt-get failed (exit $$rc)" >&2; exit $$rc; fi; \
fi
endef

.PHONY: help demo demo-stop test lint venv demo-sysdeps test-sysdeps

help:
	@sed -n '4,7p' Makefile | sed 's/^# *//'

demo: demo-sysdeps $(STAMP)
	scripts/demo

demo-stop:
	scripts/demo stop

test: test-sysdeps $(STAMP)
	@if [ "$$(id -u)" = 0 ]; then mkdir -p /run/sshd; fi
	@scripts/build-openssh-client $(NEW_SSH_DIR)
	@rc=0; ACCESS_TUNNEL_NEW_SSH=$(CURDIR)/$(NEW_SSH_DIR)/bin/ssh $(PY) -m pytest -q $(PYTEST_ARGS) \
		|| rc=$$?; \
	if [ $$rc = 5 ]; then echo "error: pytest ran no tests (exit 5); that is a failure" >&2; fi; \
	exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

venv: $(STAMP)

demo-sysdeps:
	@$(call sysdeps,$(DEMO_SYSDEPS))

test-sysdeps:
	@$(call sysdeps,$(TEST_SYSDEPS))

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
		echo "error: Access Tunnel needs Python 3.11 or newer; $(PYTHON) is" \
			"$$($(PYTHON) -V 2>&1). Run: make PYTHON=python3.11 ..." >&2; exit 1; }
	@if [ ! -x $(VENV)/bin/pip ]; then \
		echo "creating $(VENV) with $$($(PYTHON) -V 2>&1)"; \
		rm -rf $(VENV); $(PYTHON) -m venv $(VENV); \
	fi
	$(VENV)/bin/pip install -c constraints.txt -e '.[test]' --config-settings editable_mode=compat
	@touch $@

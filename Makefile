# l4lb: `make run` starts the balancer with demo backends; `make test` runs every check.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: run test test-pure test-containers test-upgrade test-ha native deps lint typecheck bench bench-quick bench-tools bench-table sim bench-workers bench-upgrade bench-ha reliability soak clean install

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

# The Debian packages the tests use as real peers and clients, and the compiled build's C
# compiler and headers (the only list: .ci/run uses it).
DEBS := curl openssl make python3-venv util-linux iproute2 iptables chromium haproxy \
        redis-server docker.io docker-compose mmdebstrap systemd \
        caddy dnsmasq-base bind9-dnsutils ngtcp2-client nginx gcc libc6-dev python3-dev \
        keepalived nftables
deps:
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then echo "deps: all installed"; \
	elif [ "$$(id -u)" != 0 ]; then echo "deps: missing $$missing: run make deps as root"; exit 1; \
	else apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

# The compiled hot path (l4lb/native.py): built when its sources changed, where a C compiler and
# Python's headers exist; pure Python otherwise. One line says which.
native: $(STAMP)
	@$(BIN)/python -W ignore setup.py -q native

run: $(STAMP) native
	$(BIN)/l4lb run -c config/l4lb.yaml --demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy --strict l4lb

# The suite against the build `native` made; then the tests of the compiled modules once more
# as pure Python, so that the two cannot drift (CI: `make test-pure` runs the whole suite so).
# The container images (built with mmdebstrap and docker, two to three minutes) and the upgrades
# under load (real processes, thousands of clients, about three minutes), and the HA pair (network
# namespaces, keepalived, about a minute) have targets of their own, `make test-containers`,
# `make test-upgrade` and `make test-ha`, which CI runs too: `make test` stays under ten minutes.
CONTAINERS := tests/peers/test_containers.py
UPGRADES := tests/integration/test_upgrade.py
PAIR := tests/peers/test_pair.py
PURE_TESTS := tests/unit tests/integration/test_e2e.py tests/integration/test_udp.py \
              tests/integration/test_relay_exact.py tests/integration/test_proxyproto.py \
              tests/integration/test_limits.py tests/integration/test_accesslog.py \
              tests/integration/test_quic_lb.py tests/integration/test_one_path.py
test: lint typecheck native
	$(BIN)/pytest --ignore=$(CONTAINERS) --ignore=$(UPGRADES) --ignore=$(PAIR)
	@if $(BIN)/l4lb version | grep -q compiled; then \
	  echo "make test: again as pure Python: $(PURE_TESTS)"; L4LB_PURE=1 $(BIN)/pytest $(PURE_TESTS); fi

test-pure: $(STAMP)
	L4LB_PURE=1 $(BIN)/pytest --ignore=$(CONTAINERS) --ignore=$(UPGRADES) --ignore=$(PAIR)

test-containers: $(STAMP) native
	$(BIN)/pytest $(CONTAINERS)

test-upgrade: $(STAMP) native
	$(BIN)/pytest $(UPGRADES)

# An HA pair in network namespaces: real keepalived, nftables, redis-server (as root; about a
# minute: five pairs built and torn down).
test-ha: $(STAMP) native
	$(BIN)/pytest -s $(PAIR)

# Faults, floods and hostile input at full load, one table (docs/reliability.md); `make test`
# runs the fast ones at small loads. The soak: 10 minutes of churn, descriptors and RSS flat.
reliability: $(STAMP) native
	$(BIN)/python -m tests.reliability

soak: $(STAMP) native
	$(BIN)/python -m tests.reliability --soak 600

# The side-by-side benchmark (README, "Performance"): Debian's peers and load tools, then the run.
bench-tools:
	@for t in haproxy nginx wrk iperf3 redis-server valgrind; do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ] || [ ! -e /usr/lib/nginx/modules/ngx_stream_module.so ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy nginx libnginx-mod-stream wrk iperf3 redis-server valgrind; \
	fi

bench: $(STAMP) native bench-tools
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/upgrade_vs.py --json bench/results/upgrade-vs-$$(date +%Y%m%d-%H%M%S).json

# An upgrade under load, l4lb against HAProxy's SIGUSR2 (also the last rows of `make bench`); and
# at scale (10,000 connections, a million pins)
bench-upgrade: $(STAMP) native bench-tools
	$(BIN)/python bench/upgrade_vs.py
	$(BIN)/python bench/upgrade_bench.py

# An HA pair's planned hand-over at 20, 200 and 1,000 open connections (as root: namespaces,
# keepalived, nftables; docs/performance.md).
bench-ha: $(STAMP) native deps
	$(BIN)/python bench/ha_pair.py

bench-quick: $(STAMP) native bench-tools
	$(BIN)/python bench/bench.py --quick

bench-table: $(STAMP) native bench-tools
	$(BIN)/python bench/table_scale.py

bench-workers: $(STAMP) native bench-tools
	$(BIN)/python bench/workers.py

# The internet-scale affinity simulation (README, "Scale-out"): figures, and the plot in docs/.
sim: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[sim]'
	$(BIN)/python sim/affinity_sim.py --plot docs/sim-affinity.png --json sim/results.json

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache .hypothesis l4lb/native.stamp
	find l4lb -name '*.so' -delete

# `make install` (as root): l4lb in a venv of its own under PREFIX, BINDIR/l4lb linking to it,
# the systemd unit in UNITDIR (its paths made these) and a sample configuration in CONFDIR
# when there is none. Every path can be moved (`make install PREFIX=/srv/l4lb ...`), and
# DESTDIR stages the whole tree under a root of its own for a package (nothing is written
# outside it; the venv's scripts name PREFIX, where the package will put them).
# The configuration is 0644: the unit's DynamicUser must read it, and it holds no secret (the
# admin token and a QUIC-LB key go in files of their own: docs/deployment.md).
PREFIX  ?= /opt/l4lb
BINDIR  ?= /usr/local/bin
UNITDIR ?= /etc/systemd/system
CONFDIR ?= /etc/l4lb
DESTDIR ?=
install:
	$(PYTHON) -m venv --clear $(DESTDIR)$(PREFIX)
	$(DESTDIR)$(PREFIX)/bin/python -m pip install --quiet --upgrade pip
	$(DESTDIR)$(PREFIX)/bin/python -m pip install --quiet .
	@if [ -n "$(DESTDIR)" ]; then \
	  grep -rlF '$(DESTDIR)$(PREFIX)' $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/pyvenv.cfg | \
	    xargs -r sed -i 's|$(DESTDIR)$(PREFIX)|$(PREFIX)|g'; fi
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(CONFDIR)
	ln -sfn $(PREFIX)/bin/l4lb $(DESTDIR)$(BINDIR)/l4lb
	sed -e 's|/usr/local/bin/l4lb|$(BINDIR)/l4lb|g' -e 's|/etc/l4lb/|$(CONFDIR)/|g' \
	  contrib/systemd/l4lb.service > $(DESTDIR)$(UNITDIR)/l4lb.service
	test -e $(DESTDIR)$(CONFDIR)/l4lb.yaml || \
	  install -m 0644 contrib/systemd/l4lb.yaml $(DESTDIR)$(CONFDIR)/l4lb.yaml
	@echo "installed $$($(DESTDIR)$(PREFIX)/bin/python -m l4lb version) in $(DESTDIR)$(PREFIX);"\
	  "$(DESTDIR)$(BINDIR)/l4lb, $(DESTDIR)$(UNITDIR)/l4lb.service, $(DESTDIR)$(CONFDIR)/l4lb.yaml."\
	  "Then: systemctl daemon-reload && systemctl enable --now l4lb"

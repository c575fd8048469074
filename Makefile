# l4lb: `make run` starts the balancer with demo backends; `make test` runs every check.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: run test deps lint typecheck bench bench-quick bench-tools bench-table sim bench-workers reliability soak clean install

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

# The Debian packages the tests use as real peers and clients (the only list: .ci/run uses it).
DEBS := curl openssl make python3-venv util-linux iproute2 iptables chromium haproxy \
        redis-server docker.io docker-compose mmdebstrap systemd \
        caddy dnsmasq-base bind9-dnsutils ngtcp2-client nginx
deps:
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then echo "deps: all installed"; \
	elif [ "$$(id -u)" != 0 ]; then echo "deps: missing $$missing: run make deps as root"; exit 1; \
	else apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

run: $(STAMP)
	$(BIN)/l4lb run -c config/l4lb.yaml --demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy --strict l4lb

test: lint typecheck
	$(BIN)/pytest

# Faults, floods and hostile input at full load, one table (docs/reliability.md); `make test`
# runs the fast ones at small loads. The soak: 10 minutes of churn, descriptors and RSS flat.
reliability: $(STAMP)
	$(BIN)/python -m tests.reliability

soak: $(STAMP)
	$(BIN)/python -m tests.reliability --soak 600

# The side-by-side benchmark (README, "Performance"): Debian's peers and load tools, then the run.
bench-tools:
	@for t in haproxy nginx wrk iperf3 redis-server; do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ] || [ ! -e /usr/lib/nginx/modules/ngx_stream_module.so ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy nginx libnginx-mod-stream wrk iperf3 redis-server; \
	fi

bench: $(STAMP) bench-tools
	$(BIN)/python bench/bench.py

bench-quick: $(STAMP) bench-tools
	$(BIN)/python bench/bench.py --quick

bench-table: $(STAMP) bench-tools
	$(BIN)/python bench/table_scale.py

bench-workers: $(STAMP) bench-tools
	$(BIN)/python bench/workers.py

# The internet-scale affinity simulation (README, "Scale-out"): figures, and the plot in docs/.
sim: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[sim]'
	$(BIN)/python sim/affinity_sim.py --plot docs/sim-affinity.png --json sim/results.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

# `make install` (as root): l4lb in a venv of its own under PREFIX, BINDIR/l4lb linking to it,
# the systemd unit in UNITDIR (its paths made these) and a sample configuration in CONFDIR
# when there is none. Every path can be moved (`make install PREFIX=/srv/l4lb ...`).
PREFIX  ?= /opt/l4lb
BINDIR  ?= /usr/local/bin
UNITDIR ?= /etc/systemd/system
CONFDIR ?= /etc/l4lb
install:
	$(PYTHON) -m venv --clear $(PREFIX)
	$(PREFIX)/bin/python -m pip install --quiet --upgrade pip
	$(PREFIX)/bin/python -m pip install --quiet .
	install -d $(BINDIR) $(UNITDIR) $(CONFDIR)
	ln -sfn $(PREFIX)/bin/l4lb $(BINDIR)/l4lb
	sed -e 's|/usr/local/bin/l4lb|$(BINDIR)/l4lb|g' -e 's|/etc/l4lb/|$(CONFDIR)/|g' \
	  contrib/systemd/l4lb.service > $(UNITDIR)/l4lb.service
	test -e $(CONFDIR)/l4lb.yaml || install -m 0640 contrib/systemd/l4lb.yaml $(CONFDIR)/l4lb.yaml
	@echo "installed $$($(BINDIR)/l4lb version) in $(PREFIX); $(BINDIR)/l4lb, $(UNITDIR)/l4lb.service,"\
	  "$(CONFDIR)/l4lb.yaml. Then: systemctl daemon-reload && systemctl enable --now l4lb"

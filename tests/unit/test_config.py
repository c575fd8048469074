import textwrap
from pathlib import Path

import pytest

from l4lb.config import ConfigError, load_config, load_config_text, parse_duration, parse_netmask

ISSUE_EXAMPLE = """\
groups:
  web:                       # a mark group: one virtual service, one affinity table
    mark: 1                  # optional integer id (defaults to the order in the file)
    listen: ["0.0.0.0"]      # addresses to bind; default ["0.0.0.0"]; "::" for IPv6
    ports: [80, 443]         # listener ports that share the group's persistence
    scheduler: wlc           # rr | wrr | lc | wlc | sh | mh | p2c | fo
    persistence:
      timeout: 360s          # "0" turns persistence off; plain numbers are seconds; "5m" works
      netmask: 255.255.255.0 # or "/24"; default /32
      ipv6_prefix: 64        # default 128
    connect_timeout: 2s
    idle_timeout: 15m
    backends:
      - name: web1           # stable identity (affinity survives reordering and edits)
        address: 10.0.0.11   # connections go to the same port the client used
        weight: 1
      - name: web2
        address: 127.0.0.1
        ports: {80: 18081, 443: 18444}   # service port -> backend port, for backends on other ports
        weight: 2
"""


def test_the_contract_example_loads() -> None:
    c = load_config_text(ISSUE_EXAMPLE)
    (g,) = c.groups
    assert (g.name, g.mark, g.listen, g.ports, g.scheduler) == (
        "web",
        1,
        ("0.0.0.0",),
        (80, 443),
        "wlc",
    )
    assert g.persistence.timeout == 360 and g.persistence.netmask == 0xFFFFFF00
    assert g.persistence.ipv6_prefix == 64 and g.persistence.max_entries == 1_000_000
    assert (g.connect_timeout, g.idle_timeout) == (2, 900)
    web1, web2 = g.backends
    assert web1.port_for(443) == 443 and web2.port_for(443) == 18444 and web2.weight == 2


def test_defaults() -> None:
    c = load_config_text(
        "groups:\n  a:\n    ports: [1]\n    backends: [{name: x, address: '::1'}]\n  b:\n    ports: [2]\n    backends: [{name: x, address: 192.0.2.1}]\n"
    )
    a, b = c.groups
    assert (a.mark, b.mark) == (1, 2)
    assert a.listen == ("0.0.0.0",) and a.scheduler == "wlc"
    assert a.persistence.timeout == 360 and a.persistence.netmask == 0xFFFFFFFF
    assert a.persistence.ipv6_prefix == 128 and a.backends[0].weight == 1


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("360s", 360),
        ("5m", 300),
        ("1.5h", 5400),
        ("250ms", 0.25),
        (30, 30),
        ("30", 30),
        ("0", 0),
        ("1d", 86400),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "mask"),
    [("/24", 0xFFFFFF00), (16, 0xFFFF0000), ("255.0.255.0", 0xFF00FF00), ("/0", 0)],
)
def test_netmasks(text: object, mask: int) -> None:
    assert parse_netmask(text) == mask


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_config_text(textwrap.dedent(text), "f.yaml")
    return exc.value.lines


GOOD_GROUP = """\
groups:
  web:
    ports: [80, 443]
    backends:
      - {name: a, address: 10.0.0.1}
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            GOOD_GROUP.replace("ports: [80, 443]", "ports: [80, 443]\n    colour: red"),
            "f.yaml:4: groups.web.colour: unknown key",
        ),
        (
            GOOD_GROUP.replace("address: 10.0.0.1}", "address: 10.0.0.1, weight: two}"),
            "f.yaml:5: groups.web.backends[0].weight: expected an integer from 0 to 65535, got 'two'",
        ),
        (
            GOOD_GROUP.replace("address: 10.0.0.1}", "address: 10.0.0.1, weight: -1}"),
            "f.yaml:5: groups.web.backends[0].weight: must be from 0 to 65535, got -1",
        ),
        (
            GOOD_GROUP.replace("address: 10.0.0.1", "address: web_example!"),
            "f.yaml:5: groups.web.backends[0].address: expected an IP address",
        ),
        (
            GOOD_GROUP.replace("{name: a, ", "{"),
            "f.yaml:5: groups.web.backends[0]: missing required key 'name'",
        ),
        (
            GOOD_GROUP.replace("ports: [80, 443]", "ports: [80, 70000]"),
            "f.yaml:3: groups.web.ports[1]: must be from 1 to 65535, got 70000",
        ),
        (
            GOOD_GROUP.replace("ports: [80, 443]", "ports: [80, 80]"),
            "f.yaml:3: groups.web.ports[1]: port 80 is listed twice",
        ),
        (
            GOOD_GROUP.replace("ports: [80, 443]", "ports: []"),
            "f.yaml:3: groups.web.ports: must list at least one port",
        ),
        (
            GOOD_GROUP.replace("ports: [80, 443]", "ports: 80"),
            "f.yaml:3: groups.web.ports: expected a list",
        ),
        (
            GOOD_GROUP.replace("    ports: [80, 443]\n", ""),
            "f.yaml:3: groups.web: missing required key 'ports'",
        ),
        (
            GOOD_GROUP.replace("ports: [80, 443]", "ports: [80, 443]\n    scheduler: fastest"),
            "f.yaml:4: groups.web.scheduler: expected one of rr, wrr, lc, wlc, sh, mh, p2c, fo",
        ),
        (
            GOOD_GROUP.replace(
                "ports: [80, 443]", "ports: [80, 443]\n    persistence: {timeout: forever}"
            ),
            "f.yaml:4: groups.web.persistence.timeout: expected a duration",
        ),
        (
            GOOD_GROUP.replace(
                "ports: [80, 443]", "ports: [80, 443]\n    persistence: {netmask: 255.255.0}"
            ),
            "f.yaml:4: groups.web.persistence.netmask: expected a netmask",
        ),
        (
            GOOD_GROUP.replace(
                "ports: [80, 443]", "ports: [80, 443]\n    persistence: {ipv6_prefix: 129}"
            ),
            "f.yaml:4: groups.web.persistence.ipv6_prefix: must be from 0 to 128, got 129",
        ),
        (
            GOOD_GROUP.replace(
                "ports: [80, 443]", "ports: [80, 443]\n    persistence: {max_entries: 0}"
            ),
            "f.yaml:4: groups.web.persistence.max_entries: must be from 1",
        ),
        (
            GOOD_GROUP.replace("ports: [80, 443]", "ports: [80, 443]\n    connect_timeout: 0"),
            "f.yaml:4: groups.web.connect_timeout: must be greater than 0",
        ),
        (
            GOOD_GROUP.replace(
                "ports: [80, 443]", "ports: [80, 443]\n    listen: [0.0.0.0, 0.0.0.0]"
            ),
            "f.yaml:4: groups.web.listen[1]: 0.0.0.0 is listed twice",
        ),
        (
            GOOD_GROUP.replace("ports: [80, 443]", "ports: [80, 443]\n    mark: 0"),
            "f.yaml:4: groups.web.mark: must be from 1",
        ),
        (
            GOOD_GROUP.replace("address: 10.0.0.1}", "address: 10.0.0.1, ports: {8080: 1}}"),
            "f.yaml:5: groups.web.backends[0].ports.8080: 8080 not among the group's ports (80, 443)",
        ),
        (
            GOOD_GROUP.replace(
                "address: 10.0.0.1}", "address: 10.0.0.1}\n      - {name: a, address: 10.0.0.2}"
            ),
            "f.yaml:6: groups.web.backends[1].name: backend name 'a' is used twice",
        ),
        (
            GOOD_GROUP.replace(
                "  web:", "  web:\n    mark: 1\n    ports: [1]\n    backends: []\n  web:"
            ),
            "duplicate key",
        ),
        (
            GOOD_GROUP
            + "  api:\n    mark: 1\n    ports: [8080]\n    backends: [{name: a, address: 10.0.0.1}]\n",
            "f.yaml:7: groups.api.mark: mark 1 is also used by group 'web'",
        ),
        (
            GOOD_GROUP
            + "  api:\n    listen: [127.0.0.1]\n    ports: [443]\n    backends: [{name: a, address: 10.0.0.1}]\n",
            "f.yaml:7: groups.api.ports: 127.0.0.1 port 443 is also bound by group 'web'",
        ),
        ("groups: {}\n", "f.yaml:1: groups: must define at least one group"),
        ("listeners: []\n", "f.yaml:1: listeners: unknown key"),
        ("groups:\n  web: [1\n", "f.yaml:3: invalid YAML"),
        ("", "f.yaml:1: the file is empty"),
        ("- 1\n", "f.yaml:1: expected a mapping"),
    ],
)
def test_each_error_is_one_line_with_file_line_and_path(text: str, expected: str) -> None:
    lines = errors_of(text)
    assert any(expected in line for line in lines), lines
    assert all(line.startswith("f.yaml:") and "\n" not in line for line in lines)


def test_a_port_listed_twice_is_one_error_not_five() -> None:
    """Issue 33: a port listed twice in one group gave follow-on errors from every backend
    whose ports map named the group's ports (they read as 'not among the group's ports ()')."""
    text = GOOD_GROUP.replace("ports: [80, 443]", "ports: [80, 443, 80]").replace(
        "{name: a, address: 10.0.0.1}",
        "{name: a, address: 10.0.0.1, ports: {80: 8080, 443: 8443}}\n"
        "      - {name: b, address: 10.0.0.2, ports: {80: 8080, 443: 8443}}",
    )
    assert errors_of(text) == ["f.yaml:3: groups.web.ports[2]: port 80 is listed twice"]


def test_all_errors_are_reported_at_once() -> None:
    lines = errors_of(
        GOOD_GROUP.replace(
            "ports: [80, 443]", "ports: [80, 443]\n    scheduler: x\n    idle_timeout: y"
        )
    )
    assert len(lines) == 2


def test_multi_port_group_without_persistence_warns() -> None:
    c = load_config_text(
        GOOD_GROUP.replace("ports: [80, 443]", "ports: [80, 443]\n    persistence: {timeout: 0}"),
        "f.yaml",
    )
    assert c.groups[0].persistence.enabled is False
    assert len(c.warnings) == 1 and "warning" in c.warnings[0] and "f.yaml:3:" in c.warnings[0]


def test_missing_file() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config("/nonexistent/l4lb.yaml")
    assert exc.value.lines == [
        "/nonexistent/l4lb.yaml: cannot read the file: No such file or directory"
    ]


def test_the_reference_config_is_valid() -> None:
    reference = (Path(__file__).resolve().parents[2] / "docs" / "reference.md").read_text()
    section = reference.split("## Configuration reference", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    config = load_config_text(block, "docs/reference.md")
    (g,) = config.groups
    assert g.health_check is not None and g.health_check.path == "/healthz"
    assert g.sorry_server is not None and g.backends[0].max_conns == 1000
    assert g.backends[1].address == "app.internal" and dict(g.backends[1].ports) == {
        80: 8080,
        443: 8443,
    }


def test_the_readme_minimal_config_is_valid() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## A minimal configuration", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    (g,) = load_config_text(block, "README.md").groups
    assert g.ports == (80, 443) and g.persistence.netmask == 0xFFFFFF00
    assert dict(g.backends[1].ports) == {80: 8080, 443: 8443}


def test_port_ranges_and_range_maps() -> None:
    c = load_config_text(
        "groups:\n  ftp:\n    ports: [21, '30000-30099']\n    backends:\n"
        "      - {name: a, address: 10.0.0.1}\n"
        "      - {name: b, address: 10.0.0.2, ports: {21: 2121, '30000-30099': '40000-40099'}}\n"
    )
    (g,) = c.groups
    assert len(g.ports) == 101 and g.ports[0] == 21 and g.ports[-1] == 30099
    a, b = g.backends
    assert a.port_for(30042) == 30042 and b.port_for(30042) == 40042 and b.port_for(21) == 2121


@pytest.mark.parametrize(
    ("ports", "backend_ports", "expected"),
    [
        (
            "[21, '30000-30099']",
            "{'30000-30099': '40000-40098'}",
            "maps 100 ports onto 99: sizes must match",
        ),
        ("[21, '30099-30000']", "{}", "a range goes from low to high"),
        ("[21, '30000-70000']", "{}", "ports must be from 1 to 65535"),
        ("[21, '20-22']", "{}", "port 21 is listed twice"),
        ("[21, 'x-y']", "{}", 'expected a port or a range such as "30000-30099"'),
        (
            "[21, '30000-30009']",
            "{'30000-30010': '40000-40010'}",
            "30010 not among the group's ports (21, 30000-30009)",
        ),
    ],
)
def test_port_range_errors(ports: str, backend_ports: str, expected: str) -> None:
    lines = errors_of(
        f"groups:\n  ftp:\n    ports: {ports}\n    backends: [{{name: a, address: 10.0.0.1, ports: {backend_ports}}}]\n"
    )
    assert any(expected in line for line in lines), lines


def test_overlapping_ranges_between_groups_are_an_error() -> None:
    lines = errors_of(
        "groups:\n  a:\n    ports: ['1000-1999']\n    backends: [{name: x, address: 10.0.0.1}]\n"
        "  b:\n    ports: ['1990-2010']\n    backends: [{name: x, address: 10.0.0.1}]\n"
    )
    assert any(
        "groups.b.ports: 0.0.0.0 port 1990-1999 is also bound by group 'a'" in line
        for line in lines
    ), lines
    assert len(lines) == 1  # one line for the overlap, not one per port


def test_multi_port_warning_covers_ranges() -> None:
    c = load_config_text(
        "groups:\n  ftp:\n    ports: [21, '30000-30001']\n    persistence: {timeout: 0}\n    backends: [{name: x, address: 10.0.0.1}]\n"
    )
    assert len(c.warnings) == 1


def test_kernel_mark_errors() -> None:
    base = "groups:\n  a:\n    kernel_mark: 1\n    ports: [80]\n    backends: [{name: x, address: 10.0.0.1}]\n"
    assert any(
        "groups.a.kernel_mark: needs the top-level kernel_marks listener" in line
        for line in errors_of(base)
    )
    two = (
        "kernel_marks: {listen: ':9999'}\n"
        + base
        + "  b:\n    kernel_mark: 1\n    ports: [80]\n    backends: [{name: x, address: 10.0.0.1}]\n"
    )
    assert any(
        "groups.b.kernel_mark: mark 1 is also group 'a''s" in line for line in errors_of(two)
    )
    ok = load_config_text(
        "kernel_marks: {listen: ':9999'}\n" + base.replace("ports: [80]", "ports: [80, 443]")
    )
    assert (
        ok.kernel_marks is not None
        and ok.kernel_marks.port == 9999
        and ok.groups[0].kernel_mark == 1
    )


def test_scale_out_settings() -> None:
    c = load_config_text(
        "workers: 4\naffinity_store: {type: redis, url: 'redis://10.0.0.5:6379/1', budget: 5ms}\n"
        + GOOD_GROUP
    )
    assert c.workers == 4
    assert c.affinity_store is not None
    assert (c.affinity_store.url, c.affinity_store.budget, c.affinity_store.key_prefix) == (
        "redis://10.0.0.5:6379/1",
        0.005,
        "l4lb:",
    )
    local = load_config_text("affinity_store: {type: local}\n" + GOOD_GROUP)
    assert (local.workers, local.affinity_store) == (1, None)


@pytest.mark.parametrize(
    ("top", "expected"),
    [
        ("workers: 0\n", "f.yaml:1: workers: must be from 1 to 64, got 0"),
        ("workers: two\n", "f.yaml:1: workers: expected a number of worker processes"),
        ("affinity_store: {type: memcached}\n", "f.yaml:1: affinity_store.type: expected one of"),
        (
            "affinity_store: {url: 'http://x'}\n",
            "f.yaml:1: affinity_store.url: expected a redis://, rediss:// or unix:// URL",
        ),
        ("affinity_store: {budget: 5s}\n", "f.yaml:1: affinity_store.budget: a lookup budget"),
        ("affinity_store: {host: x}\n", "f.yaml:1: affinity_store.host: unknown key"),
    ],
)
def test_scale_out_errors(top: str, expected: str) -> None:
    lines = errors_of(top + GOOD_GROUP)
    assert any(line.startswith(expected) for line in lines), lines


@pytest.mark.parametrize("value", [".nan", ".NaN", ".inf", "+.inf", "-.inf", ".Inf"])
@pytest.mark.parametrize(
    ("where", "path"),
    [
        ("    persistence: {{timeout: {v}}}\n", "groups.web.persistence.timeout"),
        ("    health_check: {{type: tcp, interval: {v}}}\n", "groups.web.health_check.interval"),
        ("    connect_timeout: {v}\n", "groups.web.connect_timeout"),
        ("    idle_timeout: {v}\n", "groups.web.idle_timeout"),
        ("    slow_start: {v}\n", "groups.web.slow_start"),
        ("    udp_idle_timeout: {v}\n", "groups.web.udp_idle_timeout"),
        ("    client_limits: {{rate: {v}}}\n", "groups.web.client_limits.rate"),
        ("shutdown_timeout: {v}\n", "shutdown_timeout"),
        ("affinity_store: {{budget: {v}}}\n", "affinity_store.budget"),
    ],
)
def test_non_finite_numbers_are_refused_one_line_each(value: str, where: str, path: str) -> None:
    """YAML's .nan and .inf (any sign or case) are no number a key can take: a NaN timeout
    would turn persistence off without a word, and the API could not say it in JSON."""
    text = where.format(v=value)
    doc = GOOD_GROUP + text if where.startswith("    ") else text + GOOD_GROUP
    lines = errors_of(doc)
    assert len(lines) == 1, lines
    assert (
        lines[0].startswith("f.yaml:") and f": {path}: {value} is not a finite number" in lines[0]
    )

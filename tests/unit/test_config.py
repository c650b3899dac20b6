"""proxy.config: Linkerd's variable syntax, the defaults of ref section 1.5, and
problem reporting, all through ``parse(env_mapping, toml_text, cpus=...)``.

No process environment and no real cgroup tree are read: the environment is a
dict, the CPU count is passed in, and ``available_cpus`` is pointed at fake
cgroup files under ``tmp_path`` with the affinity mask replaced.
"""

from __future__ import annotations

import pytest

from proxy import config
from proxy.config import (
    DEFAULT_OPAQUE_PORTS,
    Addr,
    ConfigError,
    available_cpus,
    parse,
    parse_addr,
    parse_bool,
    parse_duration,
    parse_port_set,
    worker_count,
)

L = "LINKERD2_PROXY_"


def parsed(env: dict[str, str] | None = None, toml_text: str | None = None, cpus: int = 8) -> config.Config:
    return parse(env or {}, toml_text, cpus=cpus)


def problems_of(env: dict[str, str], toml_text: str | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(env, toml_text, cpus=8)
    return info.value.problems


# ------------------------------------------------------------------ durations


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("10s", 10.0),
        ("300ms", 0.3),
        ("1m", 60.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        (" 5s\t", 5.0),  # whitespace around, as linkerd's env/types.rs allows
        (" 5 s ", 5.0),  # meshproxy also allows it between number and unit (linkerd does not)
        ("0", 0.0),
        ("0ms", 0.0),
    ],
)
def test_duration_accepts_linkerd_syntax(raw, seconds):
    assert parse_duration(raw) == pytest.approx(seconds)


@pytest.mark.parametrize("raw", ["1.5s", "10", "abc", "-1s", "", "12y", "5 moons"])
def test_duration_rejects_decimals_bare_numbers_and_junk(raw):
    with pytest.raises(ValueError):
        parse_duration(raw)


def test_duration_error_quotes_the_input():
    with pytest.raises(ValueError, match="1.5s"):
        parse_duration("1.5s")


# ------------------------------------------------------------------ addresses


@pytest.mark.parametrize(
    ("raw", "addr", "text"),
    [
        ("0.0.0.0:4143", Addr("0.0.0.0", 4143), "0.0.0.0:4143"),
        ("[::]:4143", Addr("::", 4143), "[::]:4143"),
        ("[::1]:4140", Addr("::1", 4140), "[::1]:4140"),
        (" 127.0.0.1:4191 ", Addr("127.0.0.1", 4191), "127.0.0.1:4191"),
    ],
)
def test_addr_parses_ipv4_and_bracketed_ipv6(raw, addr, text):
    parsed_addr = parse_addr(raw)
    assert parsed_addr == addr
    assert str(parsed_addr) == text


def test_addr_knows_its_family():
    assert parse_addr("[::1]:1").family_is_ipv6 is True
    assert parse_addr("10.0.0.1:1").family_is_ipv6 is False


@pytest.mark.parametrize("raw", ["nope:xx", "1.2.3.4:70000", "[zz:1]:1", "1.2.3.4", "::1:80", ""])
def test_addr_rejects_bad_ports_and_bad_ipv6(raw):
    with pytest.raises(ValueError):
        parse_addr(raw)


@pytest.mark.parametrize("raw", ["[zz]:1", "[1.2.3.4]:80"])
def test_addr_rejects_brackets_around_anything_but_ipv6(raw):
    with pytest.raises(ValueError):
        parse_addr(raw)


# ------------------------------------------------------------------ port sets


def test_port_set_takes_ports_and_ranges():
    assert parse_port_set("25,587,4000-4100") == frozenset({25, 587, *range(4000, 4101)})


def test_port_set_ignores_whitespace_and_empty_entries():
    assert parse_port_set(" 1, ,2,\t3- 5,") == frozenset({1, 2, 3, 4, 5})


def test_port_set_empty_means_no_ports():
    assert parse_port_set("") == frozenset()


@pytest.mark.parametrize("raw", ["0", "5-3", "x", "80,http", "1-70000", "-1", "2-"])
def test_port_set_rejects_zero_backwards_ranges_and_words(raw):
    with pytest.raises(ValueError):
        parse_port_set(raw)


# ------------------------------------------------------------------ booleans


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("TRUE", True), ("false", False), (" False ", False)])
def test_bool_accepts_true_and_false_in_any_case(raw, value):
    assert parse_bool(raw) is value


def test_bool_rejects_other_words():
    with pytest.raises(ValueError, match="maybe"):
        parse_bool("maybe")


def test_bool_variable_is_parsed_from_env():
    assert parsed({L + "SHUTDOWN_ENDPOINT_ENABLED": "true"}).shutdown_endpoint_enabled is True


# ------------------------------------------------------------------ defaults (ref 1.1, 1.5)


@pytest.mark.parametrize(
    ("attr", "default"),
    [
        ("inbound_listen", Addr("0.0.0.0", 4143)),
        ("admin_listen", Addr("127.0.0.1", 4191)),
        ("control_listen", Addr("0.0.0.0", 4190)),
        ("inbound_connect_timeout", 0.3),
        ("outbound_connect_timeout", 1.0),
        ("inbound_detect_timeout", 10.0),
        ("outbound_detect_timeout", 10.0),
        ("inbound_http_failfast_timeout", 1.0),
        ("outbound_http_failfast_timeout", 3.0),
        ("outbound_tcp_failfast_timeout", 3.0),
        ("inbound_http_queue_capacity", 10000),
        ("outbound_http_queue_capacity", 10000),
        ("outbound_tcp_queue_capacity", 10000),
        ("inbound_max_in_flight", 100000),
        ("outbound_max_in_flight", 100000),
        ("outbound_discovery_idle_timeout", 5.0),
        ("inbound_discovery_idle_timeout", 90.0),
        ("inbound_http1_pool_idle_timeout", 3.0),
        ("outbound_http1_pool_idle_timeout", 3.0),
        ("shutdown_grace_period", 120.0),
        ("shutdown_endpoint_enabled", False),
        ("metrics_retain_idle", 600.0),
        ("ingress_mode", False),
        ("log_format", "plain"),
        ("identity_min_refresh", 10.0),
        ("identity_max_refresh", 86400.0),
        ("http2_initial_stream_window", 65535),
        ("http2_initial_connection_window", 1048576),
        ("inbound_default_policy", "all-unauthenticated"),
        ("destination_profile_suffixes", ("svc.cluster.local.",)),
        ("inbound_opaque_ports", frozenset({25, 587, 3306, 4444, 5432, 6379, 9300, 11211})),
    ],
)
def test_default_matches_reference(attr, default):
    value = getattr(parsed(), attr)
    if isinstance(default, float):
        assert value == pytest.approx(default)
    else:
        assert value == default


def test_default_outbound_listen_is_ipv4_loopback_4140():
    assert parsed().outbound_listen == (Addr("127.0.0.1", 4140),)


def test_default_opaque_ports_constant_is_the_chart_list():
    assert sorted(DEFAULT_OPAQUE_PORTS) == [25, 587, 3306, 4444, 5432, 6379, 9300, 11211]


def test_default_backoff_matches_reference():
    cfg = parsed()
    assert (cfg.inbound_backoff_min, cfg.inbound_backoff_max, cfg.inbound_backoff_jitter) == pytest.approx((0.1, 10.0, 0.1))
    assert (cfg.outbound_backoff_min, cfg.outbound_backoff_max, cfg.outbound_backoff_jitter) == pytest.approx((0.1, 60.0, 0.1))


def test_default_log_filter_is_warn_with_linkerd_at_info():
    from proxy.log import LEVELS, LogFilter

    cfg = parsed()
    f = LogFilter.parse(cfg.log_filter)
    assert f.default == LEVELS["warn"]
    assert f.level_for("proxy.transport.relay") == LEVELS["info"]
    assert cfg.log_filter.startswith("warn,linkerd=info")


def test_default_log_filter_text_matches_reference():
    assert parsed().log_filter == "warn,linkerd=info,hickory=error"


def test_env_value_looks_up_by_variable_name():
    assert parsed({L + "INBOUND_CONNECT_TIMEOUT": "2s"}).env_value(L + "INBOUND_CONNECT_TIMEOUT") == 2.0


def test_unset_attribute_raises_attribute_error():
    with pytest.raises(AttributeError):
        parsed().no_such_setting  # noqa: B018


# ------------------------------------------------------------------ values from env


def test_env_overrides_default():
    cfg = parsed({L + "INBOUND_CONNECT_TIMEOUT": "100ms", L + "INBOUND_LISTEN_ADDR": "[::]:4143"})
    assert cfg.inbound_connect_timeout == pytest.approx(0.1)
    assert cfg.inbound_listen == Addr("::", 4143)


def test_log_format_is_case_insensitive():
    assert parsed({L + "LOG_FORMAT": "JSON"}).log_format == "json"


def test_empty_opaque_ports_variable_means_no_opaque_ports():
    assert parsed({L + "INBOUND_PORTS_DISABLE_PROTOCOL_DETECTION": ""}).inbound_opaque_ports == frozenset()


# ------------------------------------------------------------------ problems


def test_every_bad_variable_is_reported_together():
    env = {
        L + "INBOUND_CONNECT_TIMEOUT": "1.5s",
        L + "ADMIN_LISTEN_ADDR": "nope:xx",
        L + "INBOUND_PORTS": "5-3",
        L + "SHUTDOWN_ENDPOINT_ENABLED": "maybe",
        L + "LOG": "warn,linkerd=loud",
    }
    problems = problems_of(env)
    assert len(problems) == len(env)
    for name in env:
        assert sum(p.startswith(name + ":") for p in problems) == 1, (name, problems)


def test_config_error_message_lists_every_problem():
    with pytest.raises(ConfigError) as info:
        parse({L + "INBOUND_CONNECT_TIMEOUT": "x", L + "OUTBOUND_CONNECT_TIMEOUT": "y"}, cpus=1)
    text = str(info.value)
    assert L + "INBOUND_CONNECT_TIMEOUT" in text
    assert L + "OUTBOUND_CONNECT_TIMEOUT" in text


def test_exit_code_for_bad_configuration_is_ex_usage():
    assert config.EX_USAGE == 64


def test_unknown_linkerd_variables_are_listed_not_fatal():
    cfg = parsed({L + "NOT_A_THING": "1", L + "ALSO_UNKNOWN": "x", "PATH": "/bin", L + "INBOUND_PORTS": "80"})
    assert cfg.unknown_variables == (L + "ALSO_UNKNOWN", L + "NOT_A_THING")
    assert cfg.inbound_ports == frozenset({80})


def test_variables_linkerd_reads_but_we_ignore_are_not_unknown():
    assert parsed({L + "TAP_SVC_NAME": "tap.linkerd"}).unknown_variables == ()


def test_three_outbound_listen_addrs_are_rejected():
    problems = problems_of({L + "OUTBOUND_LISTEN_ADDRS": "127.0.0.1:4140,[::1]:4140,127.0.0.2:4140"})
    assert len(problems) == 1
    assert "OUTBOUND_LISTEN_ADDRS" in problems[0]


def test_two_outbound_listen_addrs_are_taken():
    cfg = parsed({L + "OUTBOUND_LISTEN_ADDRS": "127.0.0.1:4140,[::1]:4140"})
    assert cfg.outbound_listen == (Addr("127.0.0.1", 4140), Addr("::1", 4140))


def test_legacy_outbound_listen_addr_is_used_when_plural_is_unset():
    assert parsed({L + "OUTBOUND_LISTEN_ADDR": "127.0.0.1:5140"}).outbound_listen == (Addr("127.0.0.1", 5140),)


def test_plural_outbound_listen_addrs_wins_over_legacy():
    cfg = parsed({L + "OUTBOUND_LISTEN_ADDR": "127.0.0.1:5140", L + "OUTBOUND_LISTEN_ADDRS": "127.0.0.1:6140"})
    assert cfg.outbound_listen == (Addr("127.0.0.1", 6140),)


def test_min_refresh_above_max_refresh_is_a_problem():
    problems = problems_of({L + "IDENTITY_MIN_REFRESH": "2d", L + "IDENTITY_MAX_REFRESH": "1d"})
    assert any("IDENTITY_MIN_REFRESH" in p for p in problems)


@pytest.mark.parametrize("ratio", ["0", "1.5"])
def test_cores_max_ratio_outside_zero_to_one_is_a_problem(ratio):
    problems = problems_of({L + "CORES_MAX_RATIO": ratio})
    assert any("CORES_MAX_RATIO" in p for p in problems)


# ------------------------------------------------------------------ TOML --config


def test_toml_grouped_key_sets_the_variable():
    cfg = parsed(toml_text='[inbound]\nconnect_timeout = "1s"\n')
    assert cfg.inbound_connect_timeout == pytest.approx(1.0)


def test_toml_top_level_key_and_typed_values():
    text = 'shutdown_grace_period = "5s"\nshutdown_endpoint_enabled = true\n[outbound]\nhttp_queue_capacity = 5\nlisten_addrs = ["127.0.0.1:4140", "[::1]:4140"]\n'
    cfg = parsed(toml_text=text)
    assert cfg.shutdown_grace_period == pytest.approx(5.0)
    assert cfg.shutdown_endpoint_enabled is True
    assert cfg.outbound_http_queue_capacity == 5
    assert cfg.outbound_listen == (Addr("127.0.0.1", 4140), Addr("::1", 4140))


def test_environment_overrides_toml():
    cfg = parsed({L + "INBOUND_CONNECT_TIMEOUT": "2s"}, toml_text='[inbound]\nconnect_timeout = "1s"\n')
    assert cfg.inbound_connect_timeout == pytest.approx(2.0)


def test_toml_unknown_key_is_reported():
    problems = problems_of({}, '[inbound]\nbogus_setting = "1s"\n')
    assert problems == ["--config: unknown key 'inbound_bogus_setting'"]


def test_toml_invalid_document_is_reported():
    problems = problems_of({}, "[inbound\nconnect_timeout = \n")
    assert len(problems) == 1
    assert problems[0].startswith("--config: not valid TOML")


def test_toml_bad_value_is_reported_with_the_variable_name():
    problems = problems_of({}, '[inbound]\nconnect_timeout = "1.5s"\n')
    assert len(problems) == 1
    assert problems[0].startswith(L + "INBOUND_CONNECT_TIMEOUT:")


# ------------------------------------------------------------------ workers (ref 1.2)


def cores(cores=None, cores_min=None, cores_max=None, ratio=None) -> dict:
    return {"cores": cores, "cores_min": cores_min, "cores_max": cores_max, "cores_max_ratio": ratio}


def test_workers_default_to_one():
    assert worker_count(cores(), available=8) == 1


def test_workers_take_cores_max():
    assert worker_count(cores(cores_max=3), available=8) == 3


def test_workers_cores_max_wins_over_ratio():
    assert worker_count(cores(cores_max=3, ratio=0.5), available=10) == 3


@pytest.mark.parametrize(("available", "ratio", "expected"), [(10, 0.5, 5), (10, 0.31, 3), (10, 0.35, 4), (8, 0.25, 2), (96, 1.0, 96)])
def test_workers_from_ratio_are_rounded(available, ratio, expected):
    assert worker_count(cores(ratio=ratio), available=available) == expected


def test_workers_ratio_rounds_half_away_from_zero_like_linkerd():
    assert worker_count(cores(ratio=0.25), available=10) == 3


def test_workers_ratio_rounding_to_zero_still_gives_one():
    assert worker_count(cores(ratio=0.01), available=4) == 1


def test_workers_cores_min_is_a_floor():
    assert worker_count(cores(cores_min=4, cores_max=2), available=8) == 4
    assert worker_count(cores(cores_min=6, ratio=0.5), available=10) == 6


def test_workers_cores_is_the_floor_when_cores_min_is_unset():
    assert worker_count(cores(cores=3), available=8) == 3


def test_workers_cores_min_wins_over_cores():
    assert worker_count(cores(cores=6, cores_min=2), available=8) == 2


def test_workers_are_capped_by_available_cpus():
    assert worker_count(cores(cores_max=4, cores_min=2), available=1) == 1
    assert worker_count(cores(cores=16), available=4) == 4


def test_workers_come_from_env_through_parse():
    assert parse({L + "CORES_MAX": "3"}, cpus=8).workers == 3
    assert parse({L + "CORES_MAX_RATIO": "0.5"}, cpus=6).workers == 3
    assert parse({L + "CORES": "16"}, cpus=2).workers == 2


# ------------------------------------------------------------------ available CPUs from cgroups


@pytest.fixture
def eight_cpus(monkeypatch):
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: set(range(8)))


def test_cgroup_v2_quota_rounds_up(tmp_path, eight_cpus):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert available_cpus(str(tmp_path)) == 2


def test_cgroup_v2_max_means_affinity(tmp_path, eight_cpus):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(str(tmp_path)) == 8


def test_cgroup_v2_quota_above_affinity_is_capped_by_affinity(tmp_path, eight_cpus):
    (tmp_path / "cpu.max").write_text("1600000 100000\n")
    assert available_cpus(str(tmp_path)) == 8


def test_cgroup_v2_tiny_quota_gives_one(tmp_path, eight_cpus):
    (tmp_path / "cpu.max").write_text("10000 100000\n")
    assert available_cpus(str(tmp_path)) == 1


def test_cgroup_v1_unlimited_quota_means_affinity(tmp_path, eight_cpus):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(str(tmp_path)) == 8


def test_cgroup_v1_quota_limits_cpus(tmp_path, eight_cpus):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("250000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(str(tmp_path)) == 3


def test_no_cgroup_files_means_affinity(tmp_path, eight_cpus):
    assert available_cpus(str(tmp_path)) == 8


def test_affinity_mask_limits_cpus(tmp_path, monkeypatch):
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: {0, 1})
    (tmp_path / "cpu.max").write_text("400000 100000\n")
    assert available_cpus(str(tmp_path)) == 2


def test_deprecated_spire_socket_name_is_read_and_the_new_name_wins():
    from proxy.config import parse

    assert parse({"LINKERD2_PROXY_IDENTITY_SPIRE_SOCKET": "unix:///run/spire.sock"}).identity_spire_addr == "unix:///run/spire.sock"
    both = {"LINKERD2_PROXY_IDENTITY_SPIRE_SOCKET": "old", "LINKERD2_PROXY_IDENTITY_SPIRE_WORKLOAD_API_ADDRESS": "new"}
    assert parse(both).identity_spire_addr == "new"

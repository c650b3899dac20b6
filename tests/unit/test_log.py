"""proxy.log: Linkerd's EnvFilter syntax mapped onto our logger names, the
process-global filter, and what a log line looks like on stdout.

The filter and structlog's configuration are process-global; the ``restore``
fixture puts both back after every test.
"""

from __future__ import annotations

import json

import pytest
import structlog

from proxy import log
from proxy.log import LEVELS, LogFilter, configure, enabled, get_logger, set_filter


@pytest.fixture(autouse=True)
def restore():
    saved_filter = log.current_filter()
    saved_structlog = structlog.get_config()
    yield
    set_filter(saved_filter)
    structlog.configure(**saved_structlog)


# ------------------------------------------------------------------ LogFilter.parse


def test_bare_level_sets_the_default():
    f = LogFilter.parse("info")
    assert f.default == LEVELS["info"]
    assert f.targets == ()


def test_target_directive_sets_that_target_only():
    f = LogFilter.parse("warn,proxy.transport=debug")
    assert f.level_for("proxy.transport") == LEVELS["debug"]
    assert f.level_for("proxy.transport.relay") == LEVELS["debug"]
    assert f.level_for("proxy.http") == LEVELS["warn"]


def test_target_matches_whole_components_only():
    f = LogFilter.parse("warn,proxy.tr=debug")
    assert f.level_for("proxy.transport") == LEVELS["warn"]


@pytest.mark.parametrize("text", ["warn,proxy=info,proxy.transport=debug", "warn,proxy.transport=debug,proxy=info"])
def test_longest_target_wins_whatever_the_order(text):
    f = LogFilter.parse(text)
    assert f.level_for("proxy.transport.relay") == LEVELS["debug"]
    assert f.level_for("proxy.app.inbound") == LEVELS["info"]
    assert f.level_for("elsewhere") == LEVELS["warn"]


def test_linkerd_target_means_the_proxy_package():
    f = LogFilter.parse("warn,linkerd=info")
    assert f.targets == (("proxy", LEVELS["info"]),)
    assert f.level_for("proxy.transport.relay") == LEVELS["info"]


@pytest.mark.parametrize("target", ["linkerd_app_inbound", "linkerd::app::inbound", "linkerd::app_inbound"])
def test_linkerd_crate_and_module_paths_map_onto_proxy_modules(target):
    f = LogFilter.parse(f"warn,{target}=debug")
    assert f.targets == (("proxy.app.inbound", LEVELS["debug"]),)
    assert f.level_for("proxy.app.inbound") == LEVELS["debug"]
    assert f.level_for("proxy.app.outbound") == LEVELS["warn"]


def test_linkerd_span_directives_are_ignored():
    f = LogFilter.parse("info,[{headers}]=off,[{request}]=off")
    assert f.default == LEVELS["info"]
    assert f.targets == ()


def test_off_disables_everything():
    f = LogFilter.parse("off")
    assert f.default == LEVELS["off"]
    assert f.level_for("proxy") > LEVELS["error"]


def test_levels_are_case_insensitive_and_warning_is_warn():
    assert LogFilter.parse("WARN").default == LEVELS["warn"]
    assert LogFilter.parse("warning").default == LEVELS["warn"]


def test_invalid_level_raises_value_error_naming_it():
    with pytest.raises(ValueError, match="loud"):
        LogFilter.parse("warn,linkerd=loud")


def test_target_with_space_is_rejected():
    with pytest.raises(ValueError):
        LogFilter.parse("proxy transport=debug")


def test_parse_keeps_the_text_stripped():
    assert LogFilter.parse("  warn,linkerd=info ").text == "warn,linkerd=info"


def test_bare_target_enables_every_level_like_envfilter():
    f = LogFilter.parse("warn,linkerd")
    assert f.level_for("proxy.app") == LEVELS["trace"]


# ------------------------------------------------------------------ the global filter


def test_set_filter_changes_what_is_enabled():
    set_filter("warn")
    assert not enabled("proxy.x", LEVELS["info"])
    assert enabled("proxy.x", LEVELS["warn"])
    set_filter("info")
    assert enabled("proxy.x", LEVELS["info"])


def test_set_filter_reports_the_current_text():
    set_filter("debug,linkerd=trace")
    assert log.current_filter() == "debug,linkerd=trace"


def test_bad_set_filter_leaves_the_old_filter_in_place():
    set_filter("debug")
    with pytest.raises(ValueError):
        set_filter("linkerd=verbose")
    assert log.current_filter() == "debug"
    assert enabled("proxy.x", LEVELS["debug"])


def test_enabled_follows_target_levels():
    set_filter("error,linkerd_transport=debug")
    assert enabled("proxy.transport.relay", LEVELS["debug"])
    assert not enabled("proxy.http", LEVELS["warn"])


# ------------------------------------------------------------------ output


def test_json_line_has_level_target_event_and_timestamp(capsys):
    configure("info", "json")
    get_logger("proxy.x").info("hello", a=1)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["level"] == "info"
    assert record["target"] == "proxy.x"
    assert record["event"] == "hello"
    assert record["a"] == 1
    assert isinstance(record["timestamp"], str) and record["timestamp"][:2] == "20"


def test_debug_is_dropped_under_warn(capsys):
    configure("warn", "json")
    logger = get_logger("proxy.x")
    logger.debug("quiet")
    logger.info("quiet too")
    logger.warning("loud")
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["loud"]
    assert json.loads(lines[0])["level"] == "warn"


def test_worker_number_is_added_to_each_line(capsys):
    configure("info", "json", worker=3)
    get_logger("proxy.x").error("boom")
    assert json.loads(capsys.readouterr().out)["worker"] == 3


def test_plain_line_shows_uptime_level_target_message_and_fields(capsys):
    configure("info", "plain")
    get_logger("proxy.app").info("hello", a=1)
    line = capsys.readouterr().out.rstrip("\n")
    assert line.startswith("[")
    assert line.endswith("s]  INFO proxy.app: hello a=1")

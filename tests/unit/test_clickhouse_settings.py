"""clickhouse.cluster and clickhouse.retention: validated with the rest of the settings,
one line per mistake, every key a flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from stratoscope.cli import _regional_config, build_parser
from stratoscope.regional.config import RegionalConfig
from stratoscope.regional.sinks.clickhouse_retention import (
    SCHEMA,
    Retention,
    parse_days,
    ttl_expressions,
)
from stratoscope.settings import ConfigError

SERVER = "http://ch1:8123/stratoscope"


def config(*argv: str) -> RegionalConfig:
    return _regional_config(build_parser().parse_args(["regional", *argv]))  # type: ignore[no-any-return]


def test_defaults_are_one_server_and_the_schemas_ttls() -> None:
    ch = RegionalConfig().clickhouse
    assert ch is not None and ch.cluster is None
    # nothing set: every table keeps its TTL; shortening one needs its own setting
    assert ch.retention == Retention() and ch.retention.set_keys() == set()
    assert ch.retention_allow_shrink is False
    assert Retention(raw=35, raw_fine=7, hourly=400, profiles=14, events=30) == SCHEMA
    # the TTLs of migrations 0002, 0003 and 0006, as written there
    assert ttl_expressions(SCHEMA) == ttl_expressions(ch.retention) == {
        "metric_points": "ts + toIntervalDay(if(resolution < 60, 7, 35))",
        "histogram_points": "ts + toIntervalDay(if(resolution < 60, 7, 35))",
        "metric_points_1h": "ts + INTERVAL 400 DAY",
        "histogram_points_1h": "ts + INTERVAL 400 DAY",
        "series": "last_seen + INTERVAL 401 DAY",
        "profile_samples": "ts + INTERVAL 14 DAY",
        "profile_stacks": "last_seen + INTERVAL 30 DAY",
        "events": "toDateTime(ts) + INTERVAL 30 DAY",
    }


def test_cluster_and_retention_from_file_and_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "regional.yaml"
    cfg.write_text(f"clickhouse:\n  dsn: {SERVER}\n  cluster: prod\n  retention: {{raw: 30d, events: 10}}\n")
    ch = config("--config", str(cfg), "--clickhouse-retention-hourly", "500d").clickhouse
    assert ch is not None and ch.cluster == "prod"
    assert ch.retention == Retention(raw=30, hourly=500, events=10)
    ch = config("--clickhouse", SERVER, "--clickhouse-cluster", "{cluster}",
                "--clickhouse-retention-raw", "40d", "--clickhouse-retention-raw-fine", "3d",
                "--clickhouse-retention-profiles", "2d", "--clickhouse-retention-events", "5d").clickhouse
    assert ch is not None and ch.cluster == "{cluster}"
    assert ch.retention == Retention(raw=40, raw_fine=3, profiles=2, events=5)
    # the series outlive the longest point retention, stacks the profiles
    assert ttl_expressions(Retention(raw=800))["series"] == "last_seen + INTERVAL 801 DAY"
    assert ttl_expressions(Retention(profiles=90))["profile_stacks"] == "last_seen + INTERVAL 90 DAY"
    sink = ch.build()
    assert (sink.cluster, sink.retention) == ("{cluster}", ch.retention)  # type: ignore[attr-defined]
    assert sink.retention_allow_shrink is False  # type: ignore[attr-defined]
    # shortening a TTL: a setting of its own, from the file or a flag
    cfg.write_text(f"clickhouse:\n  dsn: {SERVER}\n  retention_allow_shrink: true\n")
    assert config("--config", str(cfg)).clickhouse.retention_allow_shrink is True  # type: ignore[union-attr]
    ch = config("--clickhouse", SERVER, "--clickhouse-retention-allow-shrink").clickhouse
    assert ch is not None and ch.retention_allow_shrink is True
    assert ch.build().retention_allow_shrink is True  # type: ignore[attr-defined]


@pytest.mark.parametrize(("argv", "message"), [
    (["--clickhouse-cluster", "prod"],
     "setting 'clickhouse' on the command line (--clickhouse-cluster): clickhouse.cluster needs a "
     "ClickHouse server (an http(s):// DSN); the embedded store is one server"),
    (["--clickhouse", SERVER, "--clickhouse-cluster", "a'b"],
     "setting 'clickhouse.cluster' on the command line (--clickhouse-cluster): invalid ClickHouse "
     "cluster name \"a'b\" (letters, digits, _ . -, or the macro {cluster})"),
    (["--clickhouse-retention-raw", "30x"],
     "setting 'clickhouse.retention.raw' on the command line (--clickhouse-retention-raw): "
     "invalid retention '30x' (whole days, e.g. 30d)"),
    (["--clickhouse-retention-events", "0d"],
     "setting 'clickhouse.retention.events' on the command line (--clickhouse-retention-events): "
     "retention must be 1d..36500d, got '0d'"),
])
def test_a_bad_setting_is_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config(*argv)
    assert str(err.value) == message


def test_an_unknown_retention_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "regional.yaml"
    cfg.write_text("clickhouse:\n  retention: {daily: 30d}\n")
    with pytest.raises(ConfigError) as err:
        config("--config", str(cfg))
    assert str(err.value) == f"unknown setting 'clickhouse.retention.daily' in {cfg}"


def test_parse_days() -> None:
    assert [parse_days(v) for v in ("30d", "30", 30, " 7 d ")] == [30, 30, 30, 7]
    for bad in ("1h", "-1d", "1.5d", True, 36501):
        with pytest.raises(ValueError):
            parse_days(bad)

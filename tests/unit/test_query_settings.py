"""The regional's query_listen setting: default on loopback, 'none' turns it off, checked
like every other address."""

from __future__ import annotations

from pathlib import Path

import pytest

from stratoscope.cli import _regional_config, build_parser
from stratoscope.regional.config import RegionalConfig
from stratoscope.settings import ConfigError


def config(*argv: str) -> RegionalConfig:
    return _regional_config(build_parser().parse_args(["regional", *argv]))  # type: ignore[no-any-return]


def test_default_flag_file_and_off(tmp_path: Path) -> None:
    assert RegionalConfig().query_listen == "127.0.0.1:9433"
    assert config("--query-listen", "0.0.0.0:9500").query_listen == "0.0.0.0:9500"
    assert config("--query-listen", "none").query_listen is None
    cfg = tmp_path / "regional.yaml"
    cfg.write_text("query_listen: null\n")
    assert config("--config", str(cfg)).query_listen is None


def test_a_bad_address_is_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        config("--query-listen", "9433")
    assert str(err.value) == ("setting 'query_listen' on the command line (--query-listen): "
                              "expected HOST:PORT, got '9433'")


def test_queries_at_once_default_one_flag_and_bounds() -> None:
    assert RegionalConfig().query_max_concurrent == 1
    assert config("--query-max-concurrent", "3").query_max_concurrent == 3
    with pytest.raises(ConfigError) as err:
        config("--query-max-concurrent", "0")
    assert "query_max_concurrent" in str(err.value) and "\n" not in str(err.value)

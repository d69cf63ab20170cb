"""``--frame-nodes``: parsed, bounded, and what the delivery queues are sized from."""

from __future__ import annotations

import pytest

from edge.errors import ConfigError
from regional.app import QUEUE_RETRY, RegionalOptions
from stratoscope.cli import _regional_options, build_parser


def test_frame_nodes_default_and_cli() -> None:
    assert RegionalOptions().frame_nodes == 250
    args = build_parser().parse_args(["regional", "--frame-nodes", "500", "--clickhouse", "none"])
    assert _regional_options(args).frame_nodes == 500
    args = build_parser().parse_args(["regional", "--clickhouse", "none"])
    assert _regional_options(args).frame_nodes == 250


@pytest.mark.parametrize("bad", [0, -1, QUEUE_RETRY // 3 + 1])
def test_frame_nodes_out_of_range_is_a_config_error(bad: int) -> None:
    args = build_parser().parse_args(["regional", "--frame-nodes", str(bad), "--clickhouse", "none"])
    with pytest.raises(ConfigError, match="frame_nodes must be 1..1000"):
        _regional_options(args)

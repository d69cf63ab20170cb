"""The few Grafana objects the dashboards use, as frozen dataclasses that render to JSON.

Why not grafana-foundation-sdk: its builders cover every panel option of one Grafana
release and render them all, while these dashboards need six panel types, three
template variables and one datasource; a hundred lines of dataclasses keep the
generated JSON small enough to read in review and keep the dependency list as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: The plugin's type name (grafana/clickhouse-datasource).
DATASOURCE_TYPE = "grafana-clickhouse-datasource"
#: The uid deploy/grafana/provisioning/datasources/stratoscope.yaml gives the datasource.
DATASOURCE_UID = "stratoscope-clickhouse"
DATASOURCE = {"type": DATASOURCE_TYPE, "uid": DATASOURCE_UID}

#: sqlds result formats (the plugin's ``format`` field): a time series frame is
#: converted from long (time, label columns, value) to wide, one field per label set.
FORMAT_TIME_SERIES = 0
FORMAT_TABLE = 1


@dataclass(frozen=True)
class Query:
    """One SQL target of a panel. ``columns`` names what the panel needs from the result."""

    sql: str
    format: int
    columns: tuple[str, ...]
    ref_id: str = "A"

    def to_json(self) -> dict[str, Any]:
        return {
            "refId": self.ref_id,
            "datasource": DATASOURCE,
            "editorType": "sql",
            "format": self.format,
            "queryType": "timeseries" if self.format == FORMAT_TIME_SERIES else "table",
            "rawSql": self.sql.strip(),
        }


@dataclass(frozen=True)
class Panel:
    """A panel: its type, one query and the options of its type."""

    type: str
    title: str
    query: Query
    description: str = ""
    unit: str = ""
    width: int = 12
    height: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    custom: dict[str, Any] = field(default_factory=dict)

    def to_json(self, panel_id: int, x: int, y: int) -> dict[str, Any]:
        defaults: dict[str, Any] = {}
        if self.unit:
            defaults["unit"] = self.unit
        if self.custom:
            defaults["custom"] = self.custom
        out: dict[str, Any] = {
            "id": panel_id,
            "type": self.type,
            "title": self.title,
            "gridPos": {"h": self.height, "w": self.width, "x": x, "y": y},
            "datasource": DATASOURCE,
            "targets": [self.query.to_json()],
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": self.options,
        }
        if self.description:
            out["description"] = self.description
        return out


@dataclass(frozen=True)
class Variable:
    """A template variable: a query over the store, or a hidden constant."""

    name: str
    label: str
    sql: str = ""
    constant: str = ""

    def to_json(self) -> dict[str, Any]:
        if self.constant:
            return {"type": "constant", "name": self.name, "label": self.label, "hide": 2,
                    "query": self.constant,
                    "current": {"text": self.constant, "value": self.constant}}
        return {
            "type": "query",
            "name": self.name,
            "label": self.label,
            "datasource": DATASOURCE,
            "query": {"editorType": "sql", "rawSql": self.sql.strip(), "format": FORMAT_TABLE},
            "definition": self.sql.strip(),
            "refresh": 2,  # on time range change: nodes come and go
            "sort": 1,
            "multi": True,
            "includeAll": True,
            "current": {"text": ["All"], "value": ["$__all"]},
            "options": [],
        }


@dataclass(frozen=True)
class Dashboard:
    """A dashboard: panels laid out left to right, top to bottom, in a 24-column grid."""

    uid: str
    title: str
    description: str
    variables: tuple[Variable, ...]
    panels: tuple[Panel, ...]
    time_from: str = "now-6h"

    def to_json(self) -> dict[str, Any]:
        panels, x, y, row_h = [], 0, 0, 0
        for i, p in enumerate(self.panels, 1):
            if x + p.width > 24:
                x, y, row_h = 0, y + row_h, 0
            panels.append(p.to_json(i, x, y))
            x, row_h = x + p.width, max(row_h, p.height)
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["stratoscope"],
            "timezone": "utc",
            "editable": True,
            "graphTooltip": 1,
            "schemaVersion": 39,
            "version": 1,
            "refresh": "1m",
            "time": {"from": self.time_from, "to": "now"},
            "templating": {"list": [v.to_json() for v in self.variables]},
            "annotations": {"list": []},
            "links": [{"type": "dashboards", "tags": ["stratoscope"], "asDropdown": True,
                       "title": "Stratoscope", "includeVars": True, "keepTime": True}],
            "panels": panels,
        }

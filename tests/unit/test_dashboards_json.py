"""The committed dashboards and provisioning: generated, valid, wired to the provisioned datasource."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from stratoscope.dashboards.build import rendered, stale
from stratoscope.dashboards.model import DATASOURCE_TYPE

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"


def provisioned_uid() -> str:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "stratoscope.yaml").read_text())
    (ds,) = doc["datasources"]
    assert ds["type"] == DATASOURCE_TYPE
    return str(ds["uid"])


def boards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))}


def test_committed_json_is_the_generators_output() -> None:
    assert stale(GRAFANA / "dashboards") == [], "run: python -m stratoscope.dashboards"
    assert sorted(boards()) == sorted(rendered()) == [
        "block.json", "fleet.json", "network.json", "processes.json", "profiles.json", "scheduler.json",
        "syscalls.json"]


def test_stale_names_a_changed_a_missing_and_a_stray_file(tmp_path: Path) -> None:
    for name, text in rendered().items():
        (tmp_path / name).write_text(text)
    (tmp_path / "fleet.json").write_text("{}")
    (tmp_path / "block.json").unlink()
    (tmp_path / "old.json").write_text("{}")
    assert stale(tmp_path) == ["block.json", "fleet.json", "old.json"]


def test_panels_ids_datasources_and_variables() -> None:
    uid = provisioned_uid()
    uids = set()
    for name, b in boards().items():
        uids.add(b["uid"])
        ids = [p["id"] for p in b["panels"]]
        assert len(ids) == len(set(ids)), name
        for p in b["panels"]:
            assert p["datasource"] == {"type": DATASOURCE_TYPE, "uid": uid}, (name, p["title"])
            assert [t["datasource"]["uid"] for t in p["targets"]] == [uid], (name, p["title"])
            assert p["targets"][0]["rawSql"].startswith(("SELECT", "WITH")), (name, p["title"])
            g = p["gridPos"]
            assert g["x"] >= 0 and g["x"] + g["w"] <= 24, (name, p["title"])
        variables = {v["name"]: v for v in b["templating"]["list"]}
        assert {"region", "node", "container"} <= variables.keys(), name
        for v in ("region", "node", "container"):
            assert variables[v]["datasource"]["uid"] == uid
            assert variables[v]["multi"] and variables[v]["includeAll"] and "allValue" not in variables[v]
    assert len(uids) == len(boards())


def test_conditional_all_phrases_survive_the_plugins_string_replace() -> None:
    """The plugin splices a phrase back with JavaScript's String.replace, where $&, $', $` and $$
    in the replacement mean something else: none of the panels' phrases may hold them."""
    for name, b in boards().items():
        for p in b["panels"]:
            assert not re.search(r"\$[&'`$]", p["targets"][0]["rawSql"]), (name, p["title"])


def test_dashboard_provider_points_at_a_folder_of_files() -> None:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "stratoscope.yaml").read_text())
    (prov,) = doc["providers"]
    assert prov["type"] == "file" and prov["options"]["path"]


def test_datasource_connection_comes_from_the_environment() -> None:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "stratoscope.yaml").read_text())
    (ds,) = doc["datasources"]
    for key in ("host", "port", "secure", "username", "defaultDatabase"):
        assert re.fullmatch(r"\$\{STRATOSCOPE_CLICKHOUSE_[A-Z]+\}", ds["jsonData"][key]), key
    assert ds["secureJsonData"] == {"password": "${STRATOSCOPE_CLICKHOUSE_PASSWORD}"}

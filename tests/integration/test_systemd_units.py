"""deploy/systemd's units and the Ansible roles' templates of them: they pass
``systemd-analyze verify`` without a warning, say the same thing, and match the code
(the capabilities edge/privileges.py expects at start-up, the paths the edge and the
regional write by default).

systemd-analyze checks that ExecStart's binary exists, so the units are verified as copies
whose ExecStart is this venv's own ``stratoscope``; the templates are rendered with the
roles' defaults by Jinja2 with Ansible's block trimming (the real ansible-playbook
rendering is tests/integration/test_ansible.py's).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from stratoscope.edge.config import DEFAULT_SPOOL_DIR
from stratoscope.regional.config import DEFAULT_DSN, DEFAULT_WAL_DIR
from stratoscope.regional.sinks.config import DEFAULT_DEAD_LETTER_ROOT

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy/systemd"
ROLES = ROOT / "deploy/ansible/roles"
STRATOSCOPE = Path(sys.executable).parent / "stratoscope"
#: Settings that differ between the shipped units and the rendered ones by design: the
#: install's paths, and StateDirectory, which only the shipped units use (the roles
#: create each install's state directory themselves, wherever it is).
PATHS = {"ExecStart", "StateDirectory", "ReadWritePaths"}


def _service(text: str) -> dict[str, str]:
    """The [Service] section's settings (one line each, comments left out)."""
    section = text.split("[Service]\n", 1)[1].split("\n[", 1)[0]
    out: dict[str, str] = {}
    for line in section.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            assert key not in out, f"{key} twice"
            out[key] = value
    return out


def verify_unit(unit: Path) -> None:
    """systemd-analyze verify, where a warning (an unknown key, a bad value) fails too."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is needed to check the units (apt install systemd)")
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), (unit.name, r.stdout, r.stderr)


def _runnable(text: str) -> str:
    """The unit with ExecStart pointing at this venv's stratoscope."""
    if not STRATOSCOPE.is_file():
        pytest.fail(f"{STRATOSCOPE} is missing: install the project into its venv")
    out, n = re.subn(r"^ExecStart=\S+/bin/stratoscope ", f"ExecStart={STRATOSCOPE} ", text,
                     flags=re.MULTILINE)
    assert n == 1, text
    return out


def _defaults(*roles: str) -> dict[str, Any]:
    out: dict[str, Any] = {"ansible_managed": "Ansible managed"}
    for role in roles:
        out.update(yaml.safe_load((ROLES / role / "defaults/main.yml").read_text()))
    return out


def _render(template: Path, **overrides: Any) -> str:
    env = jinja2.Environment(trim_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    context = {**_defaults("stratoscope", "edge", "regional"), **overrides}
    return env.from_string(template.read_text()).render(**context)


def _under(path: Path, dirs: str) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in dirs.split())


@pytest.mark.parametrize("name", ["stratoscope-edge.service", "stratoscope-regional.service"])
def test_shipped_unit_passes_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    unit = tmp_path / name
    unit.write_text(_runnable((UNITS / name).read_text()))
    verify_unit(unit)


@pytest.mark.parametrize("user", ["stratoscope", "root"])
@pytest.mark.parametrize("component", ["edge", "regional"])
def test_rendered_unit_passes_verify_and_says_what_the_shipped_one_says(
    component: str, user: str, tmp_path: Path,
) -> None:
    name = f"stratoscope-{component}.service"
    text = _render(ROLES / component / "templates" / f"{name}.j2",
                   stratoscope_user=user, stratoscope_group=user)
    unit = tmp_path / name
    unit.write_text(_runnable(text))
    verify_unit(unit)
    rendered = _service(text)
    shipped = _service((UNITS / name).read_text())
    if user == "root":  # no account lines; the edge keeps all it has, and no group gets tracefs
        dropped = ["User", "Group"]
        if component == "edge":
            dropped += ["AmbientCapabilities", "CapabilityBoundingSet", "ExecStartPre"]
            assert "remount" not in rendered.pop("ExecStartPre")
        for key in dropped:
            shipped.pop(key)
    assert {k: v for k, v in rendered.items() if k not in PATHS} == {
        k: v for k, v in shipped.items() if k not in PATHS}


def test_edge_unit_grants_what_start_up_uses_and_writes_where_the_edge_writes() -> None:
    service = _service((UNITS / "stratoscope-edge.service").read_text())
    start_up = ["CAP_BPF", "CAP_PERFMON", "CAP_SYSLOG", "CAP_SETPCAP"]
    assert service["AmbientCapabilities"].split() == start_up
    assert service["CapabilityBoundingSet"].split() == start_up
    assert _defaults("edge")["edge_capabilities"] == start_up
    assert (service["User"], service["NoNewPrivileges"], service["ProtectSystem"],
            service["LimitMEMLOCK"]) == ("stratoscope", "yes", "strict", "infinity")
    assert _under(DEFAULT_SPOOL_DIR, service["ReadWritePaths"])
    assert service["StateDirectory"] == "stratoscope/edge"
    assert service["ReadWritePaths"] == "/var/lib/stratoscope/edge"
    # Every path the example settings write is writable under the unit.
    example = yaml.safe_load((ROOT / "deploy/edge.example.yaml").read_text())
    assert _under(Path(example["spool_dir"]), service["ReadWritePaths"])
    assert _under(Path(example["output"].removeprefix("jsonl:")), service["ReadWritePaths"])


def test_regional_unit_has_no_capability_and_writes_where_the_regional_writes() -> None:
    service = _service((UNITS / "stratoscope-regional.service").read_text())
    assert (service["User"], service["CapabilityBoundingSet"], service["AmbientCapabilities"],
            service["NoNewPrivileges"], service["ProtectSystem"]) == (
        "stratoscope", "", "", "yes", "strict")
    store = Path(DEFAULT_DSN.removeprefix("chdb://"))
    for path in (DEFAULT_WAL_DIR, store, DEFAULT_DEAD_LETTER_ROOT / "clickhouse",
                 DEFAULT_DEAD_LETTER_ROOT / "kafka"):
        assert _under(path, service["ReadWritePaths"]), path
        assert _under(path, " ".join(f"/var/lib/{d}" for d in service["StateDirectory"].split()))
    # The roles put all three in the state directory the rendered unit makes writable.
    settings = (ROLES / "regional/templates/regional.yaml.j2").read_text()
    for setting in ("'wal_dir': regional_state_dir ~ '/wal'",
                    "('chdb://' ~ regional_state_dir ~ '/clickhouse')",
                    "'dead_letter_dir': regional_state_dir ~ '/dead-letter/clickhouse'",
                    "'dead_letter_dir': regional_state_dir ~ '/dead-letter/kafka'"):
        assert setting in settings + (ROLES / "regional/tasks/main.yml").read_text(), setting
    unit = _service(_render(ROLES / "regional/templates/stratoscope-regional.service.j2"))
    assert unit["ReadWritePaths"] == _defaults("regional")["regional_state_dir"]

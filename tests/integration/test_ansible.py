"""deploy/ansible, run for real: one ansible-playbook command deploys a regional and three
edges on this machine as separate installs from the wheel, data from every edge reaches
ClickHouse exactly, a second run changes nothing, and a rolling upgrade stops at the first
group whose health gate fails.

Every host of the inventory is this machine (``ansible_connection=local``), each with its
own prefix, ports and state directory, and services run by the roles' launcher
(``stratoscope_service_manager: none``: start-stop-daemon and a pidfile). The venvs see
the test venv's dependencies through a ``.pth`` line (``stratoscope_site_dirs``) and pip
installs the wheel alone (``--no-deps --no-index``), so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import site
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from stratoscope.pki import issue_certificates
from tests.conftest import kafka_bootstrap, unique_comm
from tests.integration.test_systemd_units import verify_unit

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = ROOT / "deploy" / "ansible"
BIN = Path(sys.executable).parent
EDGES = ("edge1", "edge2", "edge3")
#: openat calls the workload makes; every edge sees the same kernel, so each must store it.
OPENATS = 4000
#: A password with every character the environment file must escape; never in the output.
GRAFANA_PASSWORD = 'pw"$x`\\y\'z'
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)"
                   r"\s+skipped=(\d+)\s+rescued=(\d+)\s+ignored=(\d+)", re.MULTILINE)


def free_ports(n: int) -> list[int]:
    """n distinct ports nobody listens on (all held open until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def build_wheel(src: Path, out: Path) -> Path:
    shutil.rmtree(src / "build", ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(src)], check=True, cwd=out.parent, timeout=600)
    (whl,) = out.glob("stratoscope-*.whl")
    return whl


@dataclass
class Wheels:
    old: Path
    new: Path
    old_version: str
    new_version: str


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Wheels:
    """The wheel of this tree, and the same tree released as a newer version."""
    work = tmp_path_factory.mktemp("wheels")
    src = work / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "out", "*.egg-info", "__pycache__", ".*_cache"))
    old = build_wheel(src, work / "old")
    pyproject = src / "pyproject.toml"
    text = pyproject.read_text()
    version = re.search(r'^version = "([^"]+)"$', text, re.MULTILINE)
    assert version is not None
    new_version = f"{version.group(1)}.post1"
    pyproject.write_text(text.replace(version.group(0), f'version = "{new_version}"'))
    new = build_wheel(src, work / "new")
    return Wheels(old, new, version.group(1), new_version)


@dataclass
class Fleet:
    root: Path
    regional_port: int
    regional_metrics: int
    edge_metrics: dict[str, int]
    grafana_src: Path
    #: The fleet's CA, the regional's certificate (localhost) and one per edge
    #: (stratoscope/pki.py): the regional serves mTLS, as it does by default.
    pki: Path
    host_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def prefix(self, host: str) -> Path:
        return self.root / host

    def ctl(self, host: str) -> Path:
        kind = "regional" if host == "regional1" else "edge"
        return self.prefix(host) / "bin" / f"stratoscope-{kind}-ctl"

    def pid(self, host: str) -> int | None:
        kind = "regional" if host == "regional1" else "edge"
        pidfile = self.prefix(host) / "state" / f"{kind}.pid"
        if not pidfile.exists():
            return None
        pid = int(pidfile.read_text())
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def log(self, host: str) -> str:
        kind = "regional" if host == "regional1" else "edge"
        path = self.prefix(host) / "state" / f"{kind}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def version(self, host: str) -> str:
        # -I and cwd: no source tree of the current directory in the way
        r = subprocess.run([str(self.prefix(host) / "venv/bin/python"), "-I", "-c",
                            "import importlib.metadata as m, stratoscope; "
                            "print(m.version('stratoscope'), stratoscope.__file__)"],
                           capture_output=True, text=True, check=True, timeout=60, cwd=self.root)
        version, where = r.stdout.split()
        assert where.startswith(str(self.prefix(host) / "venv")), where
        return version

    def stop(self, host: str) -> None:
        """Stop the service with its own launcher (SIGTERM, wait for it to exit)."""
        if self.ctl(host).exists():
            subprocess.run([str(self.ctl(host)), "stop"], check=True, timeout=200)
        assert self.pid(host) is None, f"{host} still runs after stop"

    def inventory(self) -> Path:
        common = {
            "ansible_connection": "local",
            "ansible_host": "127.0.0.1",
            "ansible_python_interpreter": "/usr/bin/python3",
            "stratoscope_service_manager": "none",
            "stratoscope_user": "root",
            "stratoscope_group": "root",
            "stratoscope_site_dirs": site.getsitepackages(),
            "stratoscope_pip_extra_args": "--no-deps --no-index",
            "stratoscope_health_retries": 90,
            "stratoscope_health_delay": 1,
            "stratoscope_stop_timeout": 120,
        }

        def paths(host: str, kind: str) -> dict[str, Any]:
            p = self.prefix(host)
            return {f"{kind}_prefix": str(p), f"{kind}_config_dir": str(p / "etc"),
                    f"{kind}_state_dir": str(p / "state")}

        def pem(name: str) -> str:
            return (self.pki / name).read_text()

        edges = {h: {**paths(h, "edge"), "edge_metrics_port": self.edge_metrics[h],
                     "edge_tls_cert_pem": pem(f"{h}.crt"), "edge_tls_key_pem": pem(f"{h}.key"),
                     **self.host_overrides.get(h, {})} for h in EDGES}
        grafana = self.root / "grafana"
        inv = {"all": {"vars": common, "children": {
            "regionals": {"children": {"regionals_here": {"hosts": {"regional1": {
                **paths("regional1", "regional"), "regional_port": self.regional_port,
                "regional_metrics_port": self.regional_metrics, "regional_query_listen": "none",
                "regional_resolution": "10s", "regional_lateness": "2s",
                "regional_tls_cert_pem": pem("localhost.crt"), "regional_tls_key_pem": pem("localhost.key"),
                "regional_tls_client_ca_pem": pem("ca.crt")}}}}},
            "edges": {"children": {"edges_here": {
                "vars": {"edge_regional_group": "regionals_here", "edge_programs": ["syscalls"],
                         "edge_tls_ca_pem": pem("ca.crt"),
                         "edge_params": {"syscalls": {"LATENCY": 0}}, "edge_interval": "1s"},
                "hosts": edges}}},
            "grafana": {"hosts": {"grafana1": {
                "grafana_source_dir": str(self.grafana_src),
                "grafana_provisioning_dir": str(grafana / "provisioning"),
                "grafana_dashboards_dir": str(grafana / "dashboards"),
                "grafana_clickhouse_env_file": str(grafana / "stratoscope-clickhouse.env"),
                "grafana_clickhouse_password": GRAFANA_PASSWORD,
                "grafana_install_plugin": False, "grafana_owner": "root",
                "grafana_group": "root", "stratoscope_service_manager": "none"}}},
        }}}
        path = self.root / "inventory.yml"
        path.write_text(yaml.safe_dump(inv, sort_keys=False))
        return path


def ansible_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles"),
        "ANSIBLE_HOME": str(home),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "ANSIBLE_PIPELINING": "true",
        "ANSIBLE_NOCOLOR": "true",
        "ANSIBLE_FORCE_COLOR": "false",
        "PATH": f"{BIN}:{env.get('PATH', '')}",
        "PYTHONWARNINGS": "ignore",
    })
    return env


def playbook(playbook_path: Path, inventory: Path, home: Path, *extra: str,
             timeout: float = 1200) -> tuple[int, str, dict[str, dict[str, int]]]:
    """(exit code, output, recap per host) of one ansible-playbook run."""
    r = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), str(playbook_path), *extra],
                       capture_output=True, text=True, cwd=ANSIBLE_DIR, env=ansible_env(home),
                       timeout=timeout)
    recap = {m[0]: dict(zip(("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored"),
                            map(int, m[1:]), strict=True))
             for m in RECAP.findall(r.stdout)}
    return r.returncode, r.stdout + r.stderr, recap


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if os.geteuid() != 0:
        pytest.fail("the playbook loads BPF programs and must run as root (see README)")
    root = tmp_path_factory.mktemp("fleet")
    ports = free_ports(5)
    grafana_src = root / "grafana-src"
    for rel, text in (("provisioning/datasources/stratoscope.yaml", "apiVersion: 1\n"),
                      ("provisioning/dashboards/stratoscope.yaml", "apiVersion: 1\n"),
                      ("dashboards/overview.json", '{"title": "overview"}\n')):
        (grafana_src / rel).parent.mkdir(parents=True, exist_ok=True)
        (grafana_src / rel).write_text(text)
    issue_certificates(root / "pki", servers=["localhost"], nodes=EDGES, days=2)
    fleet = Fleet(root, ports[0], ports[1], dict(zip(EDGES, ports[2:], strict=True)), grafana_src,
                  root / "pki")
    try:
        yield fleet
    finally:
        errors = []
        for host in (*EDGES, "regional1"):
            try:
                fleet.stop(host)
            except (subprocess.SubprocessError, AssertionError) as exc:
                errors.append(f"{host}: {exc}")
                pid = fleet.pid(host)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
        assert not errors, errors


@pytest.fixture(scope="module")
def deployed(fleet: Fleet, wheels: Wheels, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """The first run: everything installed and started, every health gate passed."""
    rc, out, recap = playbook(ANSIBLE_DIR / "site.yml", fleet.inventory(), fleet.root / "ansible",
                              "-e", f"stratoscope_wheel={wheels.old}", "-e", "stratoscope_edge_serial=3")
    assert rc == 0, out[-6000:]
    assert GRAFANA_PASSWORD not in out
    assert set(recap) == {"regional1", *EDGES, "grafana1"}, out[-3000:]
    assert all(r["failed"] == 0 and r["changed"] > 0 for r in recap.values()), recap
    return fleet


def read_store(store: Path, comm: str) -> dict[str, int]:
    """openat calls of comm per node, read from the stopped regional's embedded store
    (in a child process: this one may already host another embedded store)."""
    code = (
        "import sys, clickhouse_connect\n"
        "c = clickhouse_connect.get_client(dsn='chdb://' + sys.argv[1])\n"
        "rows = c.query(\"SELECT node, sum(value) FROM stratoscope.metrics WHERE metric = "
        "'syscalls_total' AND labels['comm'] = {comm:String} AND labels['syscall'] = 'openat' "
        "GROUP BY node ORDER BY node\", parameters={'comm': sys.argv[2]}).result_rows\n"
        "print(';'.join(f'{n}={v}' for n, v in rows))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(store), comm], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return {k: int(v) for k, v in (p.split("=") for p in r.stdout.strip().split(";") if p)}


@pytest.mark.timeout(2400)
def test_deploy_is_idempotent_and_every_edge_reaches_clickhouse_exactly(
        deployed: Fleet, wheels: Wheels, workload_bin: dict[str, Path]) -> None:
    fleet = deployed
    # Each service runs from its own install, started by the role's launcher.
    for host in (*EDGES, "regional1"):
        pid = fleet.pid(host)
        assert pid is not None, fleet.log(host)[-3000:]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert str(fleet.prefix(host) / "venv/bin/stratoscope").encode() in cmdline, cmdline
        assert fleet.version(host) == wheels.old_version
    settings = yaml.safe_load((fleet.prefix("regional1") / "etc/regional.yaml").read_text())
    assert set(settings["tls"]) == {"cert", "key", "client_ca"} and "insecure" not in settings
    for host, port in fleet.edge_metrics.items():
        edge_settings = yaml.safe_load((fleet.prefix(host) / "etc/edge.yaml").read_text())
        assert {"tls_ca", "tls_cert", "tls_key"} <= set(edge_settings) and "insecure" not in edge_settings
        assert f"- 127.0.0.1:{fleet.regional_port}" in (fleet.prefix(host) / "etc/edge.yaml").read_text()
        assert f"metrics_port: {port}" in (fleet.prefix(host) / "etc/edge.yaml").read_text()
    grafana = fleet.root / "grafana"
    assert sorted(p.relative_to(grafana).as_posix() for p in grafana.rglob("*") if p.is_file()) == [
        "dashboards/overview.json", "provisioning/dashboards/stratoscope.yaml",
        "provisioning/datasources/stratoscope.yaml", "stratoscope-clickhouse.env"]
    env_file = grafana / "stratoscope-clickhouse.env"
    assert env_file.stat().st_mode & 0o777 == 0o640
    assert [line for line in env_file.read_text().splitlines() if not line.startswith("#")] == [
        'STRATOSCOPE_CLICKHOUSE_HOST="localhost"', 'STRATOSCOPE_CLICKHOUSE_PORT="9000"',
        'STRATOSCOPE_CLICKHOUSE_SECURE="false"', 'STRATOSCOPE_CLICKHOUSE_DATABASE="stratoscope"',
        'STRATOSCOPE_CLICKHOUSE_USER="stratoscope_grafana"',
        'STRATOSCOPE_CLICKHOUSE_PASSWORD="pw\\"\\$x\\`\\\\y\'z"']

    rc, out, recap = playbook(ANSIBLE_DIR / "site.yml", fleet.inventory(), fleet.root / "ansible",
                              "-e", f"stratoscope_wheel={wheels.old}", "-e", "stratoscope_edge_serial=3")
    assert rc == 0, out[-6000:]
    assert recap == {h: {**recap[h], "changed": 0, "failed": 0} for h in ("regional1", *EDGES, "grafana1")}, \
        recap

    comm = unique_comm("ansbl")
    subprocess.run([str(workload_bin["openat"]), comm, str(OPENATS), "0"], check=True, timeout=120)
    for host in EDGES:  # SIGTERM: a last drain, then every batch acked before exit
        fleet.stop(host)
    fleet.stop("regional1")  # SIGTERM: every window flushed into the store
    assert read_store(fleet.prefix("regional1") / "state/clickhouse", comm) == {
        h: OPENATS for h in EDGES}, fleet.log("regional1")[-3000:]


@pytest.mark.timeout(2400)
def test_rolling_upgrade_stops_at_the_first_group_whose_gate_fails(deployed: Fleet, wheels: Wheels) -> None:
    fleet = deployed
    # The second edge's new configuration has a setting the edge does not know: it exits 2.
    fleet.host_overrides["edge2"] = {"edge_settings": {"no_such_setting": 1}}
    rc, out, recap = playbook(ANSIBLE_DIR / "site.yml", fleet.inventory(), fleet.root / "ansible",
                              "-e", f"stratoscope_wheel={wheels.new}", "-e", "stratoscope_edge_serial=1",
                              "-e", '{"stratoscope_health_retries": 20}')
    assert rc != 0, out[-6000:]
    assert recap["regional1"]["failed"] == 0 and recap["edge1"]["failed"] == 0, recap
    assert recap["edge2"]["failed"] == 1, recap
    failed_at = out.rfind("TASK [", 0, out.index("fatal: [edge2]"))
    assert out.startswith("TASK [edge : Wait until the edge has its programs attached", failed_at), \
        out[-6000:]
    assert "edge3" not in recap or recap["edge3"]["ok"] == 0, recap
    # Upgraded and healthy up to the failing group; the group after it untouched.
    assert fleet.version("regional1") == wheels.new_version
    assert fleet.version("edge1") == wheels.new_version and fleet.pid("edge1") is not None
    assert fleet.version("edge2") == wheels.new_version and fleet.pid("edge2") is None
    assert "unknown setting 'no_such_setting'" in fleet.log("edge2"), fleet.log("edge2")[-2000:]
    assert fleet.version("edge3") == wheels.old_version


def _role_playbook(path: Path, role: str) -> Path:
    path.write_text(yaml.safe_dump([{"name": f"Only {role}", "hosts": "all", "gather_facts": False,
                                     "roles": [{"role": role}]}], sort_keys=False))
    return path


def _local_inventory(path: Path, **host_vars: Any) -> Path:
    path.write_text(yaml.safe_dump({"all": {"hosts": {"here": {
        "ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3",
        **host_vars}}}}))
    return path


@pytest.mark.timeout(900)
def test_clickhouse_schema_role_migrates_once(tmp_path: Path) -> None:
    """Missing migrations are applied (changed); then the check finds none (ok)."""
    store = tmp_path / "ch"
    settings = tmp_path / "regional.yaml"
    settings.write_text(yaml.safe_dump({"clickhouse": {"dsn": f"chdb://{store}", "migrate": False}}))
    inventory = _local_inventory(tmp_path / "inventory.yml",
                                 clickhouse_schema_stratoscope=str(BIN / "stratoscope"),
                                 clickhouse_schema_config=str(settings))
    play = _role_playbook(tmp_path / "schema.yml", "clickhouse_schema")
    rc, out, recap = playbook(play, inventory, tmp_path / "ansible")
    assert rc == 0 and recap["here"]["changed"] == 1, out[-4000:]
    rc, out, recap = playbook(play, inventory, tmp_path / "ansible")
    assert rc == 0 and recap["here"]["changed"] == 0, out[-4000:]
    check = subprocess.run([str(BIN / "stratoscope"), "regional", "--config", str(settings), "--check"],
                           capture_output=True, text=True, timeout=300)
    assert (check.returncode, check.stdout) == (0, "clickhouse: ok\n"), check.stderr[-2000:]
    # a retention setting the tables do not have yet: the check says so, the role applies
    # it (changed), and then finds nothing to do
    settings.write_text(yaml.safe_dump({"clickhouse": {"dsn": f"chdb://{store}", "migrate": False,
                                                       "retention": {"events": "45d"}}}))
    check = subprocess.run([str(BIN / "stratoscope"), "regional", "--config", str(settings), "--check"],
                           capture_output=True, text=True, timeout=300)
    assert (check.returncode, check.stdout) == (0, (
        "clickhouse: retention differs: stratoscope.events has TTL toDateTime(ts) + toIntervalDay(30),"
        " the settings ask for toDateTime(ts) + INTERVAL 45 DAY\nclickhouse: ok\n")), check.stderr[-2000:]
    rc, out, recap = playbook(play, inventory, tmp_path / "ansible")
    assert rc == 0 and recap["here"]["changed"] == 1, out[-4000:]
    rc, out, recap = playbook(play, inventory, tmp_path / "ansible")
    assert rc == 0 and recap["here"]["changed"] == 0, out[-4000:]
    check = subprocess.run([str(BIN / "stratoscope"), "regional", "--config", str(settings), "--check"],
                           capture_output=True, text=True, timeout=300)
    assert (check.returncode, check.stdout) == (0, "clickhouse: ok\n"), check.stderr[-2000:]
    # a shorter one: the apply fails with the line that names the setting
    settings.write_text(yaml.safe_dump({"clickhouse": {"dsn": f"chdb://{store}", "migrate": False,
                                                       "retention": {"events": "10d"}}}))
    rc, out, recap = playbook(play, inventory, tmp_path / "ansible")
    assert rc != 0 and recap["here"]["failed"] == 1, out[-4000:]
    assert "which deletes data; set clickhouse.retention_allow_shrink: true" in out, out[-4000:]


@pytest.mark.kafka
@pytest.mark.timeout(600)
def test_kafka_topics_role_creates_the_missing_topics_once(tmp_path: Path) -> None:
    bootstrap = kafka_bootstrap()
    prefix = unique_comm("ans-")
    settings = tmp_path / "regional.yaml"
    settings.write_text(yaml.safe_dump({"kafka": {"bootstrap": bootstrap, "topic_prefix": prefix}}))
    inventory = _local_inventory(tmp_path / "inventory.yml", kafka_topics_python=sys.executable,
                                 kafka_topics_settings=str(settings),
                                 kafka_topics_helper_dir=str(tmp_path / "bin"),
                                 kafka_topics_partitions=2, kafka_topics_replication_factor=1)
    play = _role_playbook(tmp_path / "topics.yml", "kafka_topics")
    rc, out, recap = playbook(play, inventory, tmp_path / "ansible")
    # the helper's directory, the helper, the topics
    assert rc == 0 and recap["here"]["changed"] == 3, out[-4000:]
    rc, out, recap = playbook(play, inventory, tmp_path / "ansible")
    assert rc == 0 and recap["here"]["changed"] == 0, out[-4000:]
    code = ("import asyncio, sys\nfrom aiokafka.admin import AIOKafkaAdminClient\n"
            "async def main():\n    a = AIOKafkaAdminClient(bootstrap_servers=sys.argv[1])\n"
            "    await a.start()\n    try:\n        d = await a.describe_topics(sys.argv[2:])\n"
            "    finally:\n        await a.close()\n"
            "    print(sorted((t['topic'], len(t['partitions'])) for t in d))\nasyncio.run(main())\n")
    topics = [f"{prefix}.{k}" for k in ("events", "metrics", "profiles")]
    r = subprocess.run([sys.executable, "-c", code, bootstrap, *topics], capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.strip() == repr(sorted((t, 2) for t in topics)), r.stderr[-2000:]


@pytest.mark.timeout(600)
def test_lint_production_profile_and_syntax_check(tmp_path: Path) -> None:
    """ansible-lint's production profile (offline: ansible.builtin only) and the syntax check."""
    lint = subprocess.run([str(BIN / "ansible-lint"), "--offline", "--profile", "production", "--nocolor"],
                          capture_output=True, text=True, cwd=ANSIBLE_DIR, env=ansible_env(tmp_path),
                          timeout=600)
    assert lint.returncode == 0, (lint.stdout + lint.stderr)[-4000:]
    assert "Profile 'production' was required, and it passed." in lint.stdout + lint.stderr
    syntax = subprocess.run([str(BIN / "ansible-playbook"), "--syntax-check", "-i",
                             "inventory/example/hosts.yml", "site.yml"],
                            capture_output=True, text=True, cwd=ANSIBLE_DIR, env=ansible_env(tmp_path),
                            timeout=300)
    assert syntax.returncode == 0, (syntax.stdout + syntax.stderr)[-4000:]


def _exec_start_pre(unit: Path) -> list[str]:
    """The argv systemd runs for the unit's one ``ExecStartPre=+`` line ($$ is a literal $)."""
    (line,) = [ln for ln in unit.read_text().splitlines() if ln.startswith("ExecStartPre=")]
    assert line.startswith("ExecStartPre=+/bin/sh -c '"), line
    return [arg.replace("$$", "$") for arg in shlex.split(line.removeprefix("ExecStartPre=+"))]


@pytest.mark.timeout(600)
def test_systemd_units_render_and_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """The edge, regional and grafana units as the roles render them (the roles' own templates
    and defaults, through ansible's template module) and as deploy/systemd ships them pass
    ``systemd-analyze verify`` without a warning; the edge's tracefs line really runs."""
    prefix = tmp_path / "prefix"
    (prefix / "venv/bin").mkdir(parents=True)
    (prefix / "venv/bin/stratoscope").symlink_to(BIN / "stratoscope")
    out = tmp_path / "out"
    variants = {"service": ("stratoscope", "stratoscope"), "root": ("root", "root"),
                "rootgroup": ("stratoscope", "root")}
    for name in (*variants, "grafana/grafana-server.service.d", "yaml"):
        (out / name).mkdir(parents=True)
    (out / "grafana/grafana-server.service").write_text("[Service]\nExecStart=/bin/true\n")
    roles = ANSIBLE_DIR / "roles"
    templates = {"edge": roles / "edge/templates/stratoscope-edge.service.j2",
                 "regional": roles / "regional/templates/stratoscope-regional.service.j2"}

    def render(name: str, src: Path, dest: str, loop: list[Any], **task_vars: Any) -> dict[str, Any]:
        return {"name": name, "ansible.builtin.template": {"src": str(src), "dest": dest, "mode": "0644"},
                "loop": loop, "vars": task_vars}

    play = [{"name": "Render the units", "hosts": "all", "gather_facts": False,
             "vars_files": [str(roles / r / "defaults/main.yml")
                            for r in ("stratoscope", "edge", "regional", "grafana")],
             "tasks": [
                 render(f"Render the {kind} unit", src, f"{{{{ out }}}}/{{{{ item.0 }}}}/{src.stem}",
                        [[n, u, g] for n, (u, g) in variants.items()],
                        stratoscope_user="{{ item.1 }}", stratoscope_group="{{ item.2 }}")
                 for kind, src in templates.items()] + [
                 render("Render the grafana drop-in", roles / "grafana/templates/environment.conf.j2",
                        "{{ out }}/grafana/grafana-server.service.d/stratoscope.conf", [0],
                        grafana_clickhouse_env_file="/etc/grafana/stratoscope-clickhouse.env"),
                 render("Render the regional settings", roles / "regional/templates/regional.yaml.j2",
                        "{{ out }}/yaml/{{ item.0 }}.yaml",
                        [["embedded", "chdb:///var/lib/x", ""], ["server", "https://u:p@ch:8443/db", ""],
                         ["server-explicit", "https://u:p@ch:8443/db", "127.0.0.1:9555"],
                         ["embedded-off", "chdb:///var/lib/x", "none"]],
                        regional_clickhouse_dsn="{{ item.1 }}", regional_query_listen="{{ item.2 }}"),
             ]}]
    play_path = tmp_path / "render.yml"
    play_path.write_text(yaml.safe_dump(play, sort_keys=False))
    rc, text, recap = playbook(play_path, _local_inventory(tmp_path / "inventory.yml"), tmp_path / "ansible",
                               "-e", json.dumps({"out": str(out), "edge_prefix": str(prefix),
                                                  "regional_prefix": str(prefix)}))
    assert rc == 0 and recap["here"]["failed"] == 0, text[-4000:]

    # The regional's read endpoint: on for the embedded store, off for a server unless set.
    assert {p.stem: yaml.safe_load(p.read_text())["query_listen"] for p in (out / "yaml").iterdir()} == {
        "embedded": "127.0.0.1:9433", "server": None, "server-explicit": "127.0.0.1:9555",
        "embedded-off": None}

    for name in variants:
        verify_unit(out / name / "stratoscope-edge.service")
        verify_unit(out / name / "stratoscope-regional.service")
    verify_unit(out / "grafana/grafana-server.service")
    assert (out / "grafana/grafana-server.service.d/stratoscope.conf").read_text().splitlines()[-2:] == [
        "[Service]", "EnvironmentFile=/etc/grafana/stratoscope-clickhouse.env"]
    # deploy/systemd: the same units with the example install's paths.
    static = tmp_path / "static"
    static.mkdir()
    for unit in (ROOT / "deploy/systemd").glob("*.service"):
        (static / unit.name).write_text(re.sub(r"^ExecStart=/opt/\S+/bin/stratoscope ",
                                               f"ExecStart={BIN / 'stratoscope'} ", unit.read_text(),
                                               flags=re.MULTILINE))
        verify_unit(static / unit.name)
    assert _exec_start_pre(static / "stratoscope-edge.service") == _exec_start_pre(
        out / "service/stratoscope-edge.service")
    assert "remount" not in " ".join(_exec_start_pre(out / "root/stratoscope-edge.service"))

    # The tracefs line as systemd would run it, twice (idempotent), with group root so that
    # nobody new may read tracefs; then tracefs gets back its group and mode.
    tracefs = Path("/sys/kernel/tracing")
    before = tracefs.stat()
    try:
        for name in ("rootgroup", "rootgroup", "root"):
            r = subprocess.run(_exec_start_pre(out / name / "stratoscope-edge.service"),
                               capture_output=True, text=True, timeout=60)
            assert (r.returncode, r.stderr) == (0, ""), (name, r.stderr)
            after = tracefs.stat()
            assert (after.st_gid, stat.S_IMODE(after.st_mode)) == (0, 0o750), name
            assert (tracefs / "events").is_dir()
    finally:
        subprocess.run(["mount", "-t", "tracefs", "-o",
                        f"remount,gid={before.st_gid},mode={stat.S_IMODE(before.st_mode):04o}",
                        "nodev", str(tracefs)], check=True, timeout=60)
    restored = tracefs.stat()
    assert (restored.st_gid, restored.st_mode) == (before.st_gid, before.st_mode)

"""Where the package's data lives on disk: the BPF programs and the ClickHouse schema.

Read through importlib.resources, so the same lookup serves a checkout, an editable
install and a wheel. A folder comes back as a real path because its consumers need
files: BCC compiles a program from its file (with its headers beside it), and the
schema is read migration by migration.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def data_dir(*parts: str) -> Path:
    """``stratoscope/<parts...>`` as a directory on disk (e.g. ``data_dir("bpf")``)."""
    where = files("stratoscope").joinpath(*parts)
    if not isinstance(where, Path) or not where.is_dir():
        raise FileNotFoundError(f"package data stratoscope/{'/'.join(parts)} is not a directory on disk "
                                f"({where}); install stratoscope unzipped")
    return where


def bpf_dir() -> Path:
    """The BPF programs and their descriptions (bpf/ in the source tree)."""
    return data_dir("bpf")


def clickhouse_dir(*parts: str) -> Path:
    """The ClickHouse schema: migrations/, cluster/, queries/ (deploy/clickhouse in the tree)."""
    return data_dir("deploy", "clickhouse", *parts)

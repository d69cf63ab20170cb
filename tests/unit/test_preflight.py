"""Preflight: a tracefs this user may not read is one line naming the fix, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from stratoscope.edge import preflight
from stratoscope.edge.errors import PreflightError


def test_unreadable_tracefs_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(preflight, "effective_caps", lambda: (1 << preflight.CAP_BPF) | (1 << preflight.CAP_PERFMON))

    def denied(self: Path) -> bool:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "is_dir", denied)
    with pytest.raises(PreflightError) as err:
        preflight.check(tracefs=tmp_path / "tracing", modules=tmp_path)
    assert str(err.value) == (
        f"cannot read {tmp_path / 'tracing'}: run as root, or mount tracefs readable by this "
        f"service's group (`mount -o remount,gid=GROUP,mode=0750 {tmp_path / 'tracing'}`)"
    )

"""Tests for edge.decoders.errno_names."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stratoscope.edge.decoders.errno_names import errno_name


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (1, "EPERM"),
        (2, "ENOENT"),
        (-2, "ENOENT"),
        (4, "EINTR"),
        (-4, "EINTR"),
        (11, "EAGAIN"),
        (-11, "EAGAIN"),
        (13, "EACCES"),
        (22, "EINVAL"),
        (35, "EDEADLK"),
        (95, "EOPNOTSUPP"),
        (-110, "ETIMEDOUT"),
        (111, "ECONNREFUSED"),
        (133, "EHWPOISON"),
    ],
)
def test_known_codes(code: int, name: str) -> None:
    assert errno_name(code) == name


def test_zero_is_ok() -> None:
    assert errno_name(0) == "OK"


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (512, "ERESTARTSYS"),
        (-512, "ERESTARTSYS"),
        (-516, "ERESTART_RESTARTBLOCK"),
        (517, "EPROBE_DEFER"),
        (-524, "ENOTSUPP"),
        (531, "ENOGRACE"),
    ],
)
def test_kernel_internal_codes(code: int, name: str) -> None:
    assert errno_name(code) == name


@pytest.mark.parametrize(
    ("code", "name"),
    [(520, "E520"), (-520, "E520"), (4095, "E4095"), (-4095, "E4095"), (10_000, "E10000")],
)
def test_unknown_codes_are_labelled(code: int, name: str) -> None:
    assert errno_name(code) == name


@given(st.sampled_from(sorted(errno.errorcode)))
def test_every_python_errno_names_its_own_code(code: int) -> None:
    name = errno_name(code)
    assert getattr(errno, name) == code
    assert errno_name(-code) == name


@given(st.integers(min_value=-(2**63), max_value=2**63))
def test_sign_does_not_matter(code: int) -> None:
    assert errno_name(code) == errno_name(-code)
    assert errno_name(code).startswith("E") or code == 0

"""Tests for edge.decoders.inet."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stratoscope.edge.decoders.inet import AF_INET, AF_INET6, format_endpoint

PAD = bytes(12)
ports = st.integers(min_value=0, max_value=65535)


def test_family_constants_are_linux_abi() -> None:
    assert (AF_INET, AF_INET6) == (2, 10)


@pytest.mark.parametrize(
    ("addr", "port", "expected"),
    [
        (bytes([127, 0, 0, 1]) + PAD, 80, "127.0.0.1:80"),
        (bytes([10, 1, 2, 3]) + PAD, 65535, "10.1.2.3:65535"),
        (bytes(16), 0, "0.0.0.0:0"),
        (bytes([192, 168, 0, 1]), 443, "192.168.0.1:443"),  # bare 4 bytes is fine too
        (bytes([1, 2, 3, 4]) + b"\xff" * 12, 53, "1.2.3.4:53"),  # only the first 4 bytes count
    ],
)
def test_ipv4(addr: bytes, port: int, expected: str) -> None:
    assert format_endpoint(AF_INET, addr, port) == expected


@pytest.mark.parametrize(
    ("addr", "port", "expected"),
    [
        (ipaddress.IPv6Address("::1").packed, 80, "[::1]:80"),
        (bytes(16), 0, "[::]:0"),
        (ipaddress.IPv6Address("2001:db8::1").packed, 443, "[2001:db8::1]:443"),
        (ipaddress.IPv6Address("fe80::1:2:3:4").packed, 22, "[fe80::1:2:3:4]:22"),
        (
            bytes.fromhex("20010db8000000000000000000000000"),
            8080,
            "[2001:db8::]:8080",
        ),
    ],
)
def test_ipv6(addr: bytes, port: int, expected: str) -> None:
    assert format_endpoint(AF_INET6, addr, port) == expected


def test_ipv4_mapped_ipv6_is_shown_as_ipv4() -> None:
    mapped = bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])
    assert format_endpoint(AF_INET6, mapped, 8080) == "10.0.0.1:8080"
    loopback = ipaddress.IPv6Address("::ffff:127.0.0.1").packed
    assert format_endpoint(AF_INET6, loopback, 80) == format_endpoint(
        AF_INET, bytes([127, 0, 0, 1]) + PAD, 80
    )


def test_ipv4_compatible_is_not_treated_as_mapped() -> None:
    # ::a.b.c.d (deprecated IPv4-compatible) is a real IPv6 address, not a dual-stack peer.
    assert format_endpoint(AF_INET6, bytes(12) + bytes([1, 2, 3, 4]), 1) == "[::102:304]:1"


def test_accepts_any_bytes_like() -> None:
    raw = bytes([127, 0, 0, 1]) + PAD
    assert format_endpoint(AF_INET, bytearray(raw), 1) == "127.0.0.1:1"
    assert format_endpoint(AF_INET, memoryview(raw), 1) == "127.0.0.1:1"


@pytest.mark.parametrize("family", [0, 1, 3, 17, 28, 44])
def test_unknown_family_raises(family: int) -> None:
    with pytest.raises(ValueError, match=f"unsupported address family {family} "):
        format_endpoint(family, bytes(16), 80)


def test_short_addresses_raise() -> None:
    with pytest.raises(ValueError, match="AF_INET address needs 4 bytes, got 3"):
        format_endpoint(AF_INET, b"\x01\x02\x03", 1)
    with pytest.raises(ValueError, match="AF_INET6 address needs 16 bytes, got 4"):
        format_endpoint(AF_INET6, b"\x01\x02\x03\x04", 1)


@pytest.mark.parametrize("port", [-1, 65536, 2**32])
def test_port_out_of_range_raises(port: int) -> None:
    with pytest.raises(ValueError, match=f"port {port} out of range"):
        format_endpoint(AF_INET, bytes(16), port)


@given(st.binary(min_size=4, max_size=4), st.binary(min_size=12, max_size=12), ports)
def test_ipv4_round_trip(addr: bytes, junk: bytes, port: int) -> None:
    text = format_endpoint(AF_INET, addr + junk, port)
    host, _, port_text = text.rpartition(":")
    assert ipaddress.IPv4Address(host).packed == addr
    assert int(port_text) == port


@given(st.binary(min_size=16, max_size=16), ports)
def test_ipv6_round_trip(addr: bytes, port: int) -> None:
    text = format_endpoint(AF_INET6, addr, port)
    host, _, port_text = text.rpartition(":")
    assert int(port_text) == port
    if addr[:12] == bytes(10) + b"\xff\xff":
        assert ipaddress.IPv4Address(host).packed == addr[12:]
    else:
        assert host.startswith("[")
        assert host.endswith("]")
        assert ipaddress.IPv6Address(host[1:-1]).packed == addr

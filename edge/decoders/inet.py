"""Socket address formatting for connection events captured in the kernel.

Kernel socket structs (``sock_common``) keep the address family and a fixed 16-byte address
field that holds either an IPv4 address (first 4 bytes) or an IPv6 address, so one event layout
serves both families and decoding has to branch on the family. The port must already be in host
byte order (``skc_num`` is; ``skc_dport`` needs ``ntohs`` on the BPF or the caller's side).
"""

from __future__ import annotations

import ipaddress
from typing import Final

__all__ = ["AF_INET", "AF_INET6", "format_endpoint"]

# Linux ABI values, spelled out rather than taken from ``socket`` because they describe what the
# kernel wrote into the event, not the platform this decoder happens to run on.
AF_INET: Final = 2
AF_INET6: Final = 10


def format_endpoint(family: int, addr: bytes | bytearray | memoryview, port: int) -> str:
    """Render ``addr``/``port`` as ``"1.2.3.4:80"`` or ``"[2001:db8::1]:80"``.

    IPv6 is bracketed so the port separator stays unambiguous. IPv4-mapped IPv6 addresses
    (``::ffff:a.b.c.d``, what dual-stack sockets report for IPv4 peers) are shown as plain IPv4
    so the same peer gets the same label whichever socket type saw it. An unknown family, a
    too-short address field or an out-of-range port raise ``ValueError``: they mean the event
    layout and the decoder disagree, which should be loud.
    """
    raw = bytes(addr)
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range 0..65535")
    if family == AF_INET:
        if len(raw) < 4:
            raise ValueError(f"AF_INET address needs 4 bytes, got {len(raw)}")
        return f"{ipaddress.IPv4Address(raw[:4])}:{port}"
    if family == AF_INET6:
        if len(raw) < 16:
            raise ValueError(f"AF_INET6 address needs 16 bytes, got {len(raw)}")
        ip6 = ipaddress.IPv6Address(raw[:16])
        mapped = ip6.ipv4_mapped
        if mapped is not None:
            return f"{mapped}:{port}"
        return f"[{ip6.compressed}]:{port}"
    raise ValueError(f"unsupported address family {family} (expected AF_INET=2 or AF_INET6=10)")

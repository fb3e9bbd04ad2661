"""ICMP echo packets: build a request, recognise our reply."""

from __future__ import annotations

import struct

MIN_PAYLOAD = 16  # token + sequence number
ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
ICMP6_ECHO_REQUEST = 128
ICMP6_ECHO_REPLY = 129
_ICMP_HEADER = struct.Struct("!BBHHH")
_PAYLOAD_HEAD = struct.Struct("!QQ")  # token, sequence number


def icmp_checksum(data: bytes) -> int:
    """RFC 1071 checksum (ICMPv4 only; the kernel fills it in for ICMPv6)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def build_request(seq: int, ident: int, token: int, payload_size: int, v6: bool = False) -> bytes:
    """Echo request whose payload starts with (token, 64-bit seq); the ICMP seq is seq mod 2^16."""
    payload = _PAYLOAD_HEAD.pack(token, seq) + bytes(payload_size - MIN_PAYLOAD)
    typ = ICMP6_ECHO_REQUEST if v6 else ICMP_ECHO_REQUEST
    header = _ICMP_HEADER.pack(typ, 0, 0, ident, seq & 0xFFFF)
    if v6:
        return header + payload
    csum = icmp_checksum(header + payload)
    return _ICMP_HEADER.pack(typ, 0, csum, ident, seq & 0xFFFF) + payload


def parse_reply(packet: bytes, ident: int, token: int, v6: bool = False) -> int | None:
    """Sequence number of an echo reply of this run, or None for anything else.

    IPv4 raw sockets deliver the IP header too; IPv6 raw sockets do not.
    """
    if not v6:
        if len(packet) < 20:
            return None
        packet = packet[(packet[0] & 0x0F) * 4 :]
    if len(packet) < _ICMP_HEADER.size + _PAYLOAD_HEAD.size:
        return None
    typ, code, _csum, rid, _rseq = _ICMP_HEADER.unpack_from(packet)
    if typ != (ICMP6_ECHO_REPLY if v6 else ICMP_ECHO_REPLY) or code != 0 or rid != ident:
        return None
    rtoken, seq = _PAYLOAD_HEAD.unpack_from(packet, _ICMP_HEADER.size)
    return int(seq) if rtoken == token else None

"""The peer protocol (docs/peer-protocol.md): wire format, validation, batching,
replay window and views."""
from __future__ import annotations

import ipaddress
import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from pylb import peer
from pylb.errors import PylbError
from pylb.flow_id import FlowKey, hash_bytes
from pylb.peer import (CLEAN_LEN, HEADER_LEN, MAC_LEN, QUERY_LEN, RECORD_LEN, REMOVE_LEN,
                       CleanRecord, FlowQuery, Message, MessageType, NotCarried, PeerError,
                       RemoveRecord, ReplayWindow, StateRecord, View, decode, encode,
                       encode_batches, make_version, view_of)

KEY = bytes(range(16))
OTHER_KEY = bytes(range(1, 17))
VIEW = View(member_gen=5, member_hash=0xAABBCCDD, table_gen=7)
SENDER = 0x01020304
KEYS = [None, KEY]

V4_KEY = FlowKey.parse("tcp 198.51.100.7:40000 -> 192.0.2.10:80").to_bytes()
V6_KEY = FlowKey.parse("tcp [2001:db8::7]:40000 -> [2001:db8::10]:443").to_bytes()
V4_PACKET = bytes(IP(src="198.51.100.7", dst="192.0.2.10") / TCP(sport=40000, dport=80, flags="A"))
V6_PACKET = bytes(IPv6(src="2001:db8::7", dst="2001:db8::10") / TCP(sport=40000, dport=443))


def state(i: int, v6: bool = False) -> StateRecord:
    """A distinct record per i, covering both families and both closing states."""
    if v6:
        key = FlowKey(ipaddress.IPv6Address(0x20010DB8 << 96 | i), "2001:db8::10", 1024 + i % 60000,
                      443, 6)
        backend = ipaddress.IPv6Address(0x20010DB8_0001 << 80 | i % 7)
    else:
        key = FlowKey(ipaddress.IPv4Address(0xC6336400 + i), "192.0.2.10", 1024 + i % 60000, 80, 17)
        backend = ipaddress.IPv4Address(0x0A000000 + i % 7)
    return StateRecord(key.to_bytes(), backend, make_version(1_700_000_000_000 + i, i % 3),
                       i * 10, i % 2 == 1)


def remove(i: int) -> RemoveRecord:
    return RemoveRecord(state(i, v6=i % 2 == 0).key, make_version(1_700_000_000_000, i % 5))


def clean(i: int, v6: bool = False) -> CleanRecord:
    """A distinct bucket per i, covering both protocols and the all-ports VIP."""
    vip = ipaddress.ip_address("2001:db8::10" if v6 else "192.0.2.10")
    return CleanRecord(vip, (6, 17)[i % 2], (80, 0, 443)[i % 3], 65537, i % 65537)


def query(i: int) -> FlowQuery:
    return FlowQuery(state(i, v6=i % 2 == 0).key)


def reply(i: int) -> StateRecord | NotCarried:
    """Every third balancer carries the flow."""
    return state(i, v6=i % 2 == 0) if i % 3 == 0 else NotCarried(state(i, v6=i % 2 == 0).key)


RECORD_LENS = {StateRecord: RECORD_LEN, RemoveRecord: REMOVE_LEN, CleanRecord: CLEAN_LEN,
               FlowQuery: QUERY_LEN, NotCarried: RECORD_LEN}


MESSAGES = [
    ("request, IPv4 packet", Message(MessageType.STATE_REQUEST, SENDER, VIEW, 1, (), V4_PACKET)),
    ("request, IPv6 packet", Message(MessageType.STATE_REQUEST, SENDER, VIEW, 2, (), V6_PACKET)),
    ("request, headers only", Message(MessageType.STATE_REQUEST, SENDER, VIEW, 11, (), V4_PACKET,
                                      headers_only=True)),
    ("answer", Message(MessageType.STATE_ANSWER, SENDER, VIEW, 3, (state(1),))),
    ("answers, batched", Message(MessageType.STATE_ANSWER, SENDER, VIEW, 12,
                                 tuple(state(i, i % 2) for i in range(18)))),
    ("push", Message(MessageType.STATE_PUSH, SENDER, VIEW, 4,
                     tuple(state(i, i % 2) for i in range(18)))),
    ("push, empty", Message(MessageType.STATE_PUSH, SENDER, VIEW, 5, ())),
    ("handoff", Message(MessageType.HANDOFF, 0xFFFFFFFF, View(0, 0, 0), 2**64 - 1,
                        (state(2, v6=True),))),
    ("refresh", Message(MessageType.REFRESH, 0, View(2**32 - 1, 1, 2**32 - 1), 0,
                        (state(3), state(4, v6=True)))),
    ("remove", Message(MessageType.REMOVE, SENDER, VIEW, 6, tuple(remove(i) for i in range(5)))),
    ("clean, IPv4 VIPs", Message(MessageType.CLEAN, SENDER, VIEW, 7,
                                 tuple(clean(i) for i in range(6)))),
    ("clean, IPv6 VIPs", Message(MessageType.CLEAN, SENDER, VIEW, 8,
                                 tuple(clean(i, v6=True) for i in range(6)))),
    ("clean, both families", Message(MessageType.CLEAN, SENDER, VIEW, 9,
                                     (clean(1), clean(2, v6=True)))),
    ("clean, empty", Message(MessageType.CLEAN, SENDER, VIEW, 10, ())),
    ("request, retried", Message(MessageType.STATE_REQUEST, SENDER, VIEW, 13, (), V4_PACKET,
                                 retry=True)),
    ("request, retried, headers only", Message(MessageType.STATE_REQUEST, SENDER, VIEW, 14, (),
                                               V6_PACKET, headers_only=True, retry=True)),
    ("carrier query", Message(MessageType.CARRIER_QUERY, SENDER, VIEW, 15, (query(1),))),
    ("carrier queries, batched", Message(MessageType.CARRIER_QUERY, SENDER, VIEW, 16,
                                         tuple(query(i) for i in range(35)))),
    ("carrier reply, not here", Message(MessageType.CARRIER_REPLY, SENDER, VIEW, 17,
                                        (reply(1),))),
    ("carrier replies, state and not here", Message(MessageType.CARRIER_REPLY, SENDER, VIEW, 18,
                                                    tuple(reply(i) for i in range(18)))),
]
MESSAGE_IDS = [description for description, _ in MESSAGES]


@pytest.mark.parametrize("key", KEYS, ids=["plain", "keyed"])
@pytest.mark.parametrize("msg", [m for _, m in MESSAGES], ids=MESSAGE_IDS)
def test_round_trip(msg, key):
    data = encode(msg, key)
    records_len = sum(RECORD_LENS[type(r)] for r in msg.records)
    assert len(data) == HEADER_LEN + len(msg.packet or b"") + records_len + (MAC_LEN if key else 0)
    assert decode(data, key) == msg


@pytest.mark.parametrize("msg", [m for _, m in MESSAGES], ids=MESSAGE_IDS)
def test_without_a_key_an_hmac_is_accepted_unchecked(msg):
    assert decode(encode(msg, OTHER_KEY), None) == msg


# Hand-written from docs/peer-protocol.md, field by field: if the format
# drifts, these break before any peer of another version does.
PUSH_HEX = (
    "504c4250 01 03 0000 01020304 00000005 aabbccdd 00000007 0000000000000102 0001 004c"
    " 000000000000000000000000"
    # key: src ::ffff:198.51.100.7, dst ::ffff:192.0.2.10, sport 40000 and dport 80
    # little-endian (FlowKey.to_bytes), proto 6, 3 zeros
    " 00000000000000000000ffffc6336407 00000000000000000000ffffc000020a 409c 5000 06 000000"
    " 00000000000000000000ffff0a000002"        # backend ::ffff:10.0.0.2
    " 0123456789ab0003 000005dc 01 00000000000000"  # version, idle 1500 ms, closing, pad
)
REMOVE_HEX = (
    "504c4250 01 06 {flags} 01020304 00000005 aabbccdd 00000007 0000000000000103 0001 0030"
    " 000000000000000000000000"
    " 20010db8000000000000000000000007 20010db8000000000000000000000010 409c bb01 06 000000"
    " 0123456789ab0004"
)
CLEAN_HEX = (
    "504c4250 01 07 0000 01020304 00000005 aabbccdd 00000007 0000000000000104 0002 0038"
    " 000000000000000000000000"
    # VIP ::ffff:192.0.2.10, TCP, pad, port 80, table size 65537, bucket 0x1234
    " 00000000000000000000ffffc000020a 06 00 0050 00010001 00001234"
    # VIP 2001:db8::10, UDP, pad, all ports, table size 251, bucket 250
    " 20010db8000000000000000000000010 11 00 0000 000000fb 000000fa"
)
CARRIER_QUERY_HEX = (
    "504c4250 01 08 0000 01020304 00000005 aabbccdd 00000007 0000000000000105 0001 0028"
    " 000000000000000000000000"
    " 00000000000000000000ffffc6336407 00000000000000000000ffffc000020a 409c 5000 06 000000"
)
NOT_HERE_HEX = (
    "504c4250 01 09 0000 01020304 00000005 aabbccdd 00000007 0000000000000106 0001 004c"
    " 000000000000000000000000"
    " 00000000000000000000ffffc6336407 00000000000000000000ffffc000020a 409c 5000 06 000000"
    " 00000000000000000000000000000000"        # no backend
    " 0000000000000000 00000000 02 00000000000000"  # no version, no idle, not carried, pad
)
# HMAC-SHA256(bytes(range(16)), header + payload)[:16], computed with the
# standard library's hmac alone.
REMOVE_MAC_HEX = "776b20bc5f870f0719c77859016a9b02"

PUSH = Message(MessageType.STATE_PUSH, SENDER, VIEW, 0x102, (
    StateRecord(V4_KEY, ipaddress.ip_address("10.0.0.2"), make_version(0x0123456789AB, 3), 1500,
                True),))
REMOVE = Message(MessageType.REMOVE, SENDER, VIEW, 0x103,
                 (RemoveRecord(V6_KEY, make_version(0x0123456789AB, 4)),))
CARRIER_QUERY = Message(MessageType.CARRIER_QUERY, SENDER, VIEW, 0x105, (FlowQuery(V4_KEY),))
NOT_HERE = Message(MessageType.CARRIER_REPLY, SENDER, VIEW, 0x106, (NotCarried(V4_KEY),))
CLEAN = Message(MessageType.CLEAN, SENDER, VIEW, 0x104,
                (CleanRecord(ipaddress.ip_address("192.0.2.10"), 6, 80, 65537, 0x1234),
                 CleanRecord(ipaddress.ip_address("2001:db8::10"), 17, 0, 251, 250)))

WIRE_VECTORS = [
    ("push, one record", PUSH, None, PUSH_HEX),
    ("remove, one record", REMOVE, None, REMOVE_HEX.format(flags="0000")),
    ("remove, keyed", REMOVE, KEY, REMOVE_HEX.format(flags="0001") + REMOVE_MAC_HEX),
    ("clean, two records", CLEAN, None, CLEAN_HEX),
    ("carrier query, one flow", CARRIER_QUERY, None, CARRIER_QUERY_HEX),
    ("carrier reply, not here", NOT_HERE, None, NOT_HERE_HEX),
]


@pytest.mark.parametrize("msg, key, hex_dump", [v[1:] for v in WIRE_VECTORS],
                         ids=[v[0] for v in WIRE_VECTORS])
def test_wire_vector(msg, key, hex_dump):
    wire = bytes.fromhex(hex_dump.replace(" ", ""))
    assert encode(msg, key).hex() == wire.hex()
    assert decode(wire, key) == msg


@pytest.mark.parametrize("key", KEYS, ids=["plain", "keyed"])
@pytest.mark.parametrize("msg", [m for _, m in MESSAGES], ids=MESSAGE_IDS)
def test_every_truncation_and_extension_is_malformed(msg, key):
    data = encode(msg, key)
    for cut in range(len(data)):
        with pytest.raises(PeerError) as caught:
            decode(data[:cut], key)
        assert caught.value.reason == "malformed", cut
    with pytest.raises(PeerError, match="malformed"):
        decode(data + b"\0", key)


def header(type_=3, count=1, payload_len=RECORD_LEN, magic=peer.MAGIC, version=1, flags=0,
           reserved=bytes(12)) -> bytes:
    """A header packed here, independently of peer.encode."""
    return struct.pack("!IBBHIIIIQHH12s", magic, version, type_, flags, SENDER, 5, 0xAABBCCDD, 7,
                       1, count, payload_len, reserved)


RECORD = encode(PUSH, None)[HEADER_LEN:]
REMOVAL = encode(REMOVE, None)[HEADER_LEN:]
CLEANING = encode(CLEAN, None)[HEADER_LEN:HEADER_LEN + CLEAN_LEN]    # the IPv4 VIP's record
NOT_HERE_RECORD = encode(NOT_HERE, None)[HEADER_LEN:]


def clean_header(count: int = 1) -> bytes:
    return header(type_=7, count=count, payload_len=count * CLEAN_LEN)


def patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


MALFORMED = [
    ("empty", b""),
    ("header only, short", header()[:47]),
    ("bad magic", header(magic=0x504C4251) + RECORD),
    ("version 2", header(version=2) + RECORD),
    ("version 0", header(version=0) + RECORD),
    ("type 0", header(type_=0) + RECORD),
    ("type 12", header(type_=12) + RECORD),
    ("unknown flag", header(flags=0x0008) + RECORD),
    ("headers-only flag on a push", header(flags=0x0002) + RECORD),
    ("retry flag on a push", header(flags=0x0004) + RECORD),
    ("retry flag on a carrier query", header(type_=8, flags=0x0004, payload_len=QUERY_LEN)
     + V4_KEY),
    ("carrier query without records", header(type_=8, count=0, payload_len=0)),
    ("carrier reply without records", header(type_=9, count=0, payload_len=0)),
    ("carrier query, payload not whole keys", header(type_=8, payload_len=QUERY_LEN + 1)
     + V4_KEY + b"\0"),
    ("carrier query, key padding", header(type_=8, payload_len=QUERY_LEN)
     + patched(V4_KEY, 39, b"\x01")),
    ("state records in a carrier query", header(type_=8, count=2, payload_len=2 * QUERY_LEN)
     + RECORD[:2 * QUERY_LEN]),
    ("not here with a backend", header(type_=9) + patched(NOT_HERE_RECORD, 55, b"\x01")),
    ("not here with a version", header(type_=9) + patched(NOT_HERE_RECORD, 63, b"\x01")),
    ("not here with an idle time", header(type_=9) + patched(NOT_HERE_RECORD, 67, b"\x01")),
    ("not here and closing", header(type_=9) + patched(NOT_HERE_RECORD, 68, b"\x03")),
    ("reply record flag bit 2", header(type_=9) + patched(RECORD, 68, b"\x04")),
    ("not here in an answer", header(type_=2) + NOT_HERE_RECORD),
    ("reserved byte set", header(reserved=b"\0" * 11 + b"\1") + RECORD),
    ("payload_len too small", header(payload_len=RECORD_LEN - 1) + RECORD),
    ("payload_len too big", header(payload_len=RECORD_LEN + 1) + RECORD),
    ("count too high", header(count=2) + RECORD),
    ("count zero with a record", header(count=0) + RECORD),
    ("payload not a whole record", header(payload_len=RECORD_LEN + 4) + RECORD + bytes(4)),
    ("removal records in a push", header(payload_len=REMOVE_LEN) + REMOVAL),
    ("state record in a remove", header(type_=6) + RECORD),
    ("trailing byte", header() + RECORD + b"\0"),
    ("HMAC flag, no trailer", header(flags=1) + RECORD),
    ("answer with no record", header(type_=2, count=0, payload_len=0)),
    ("request with a count", header(type_=1, count=1, payload_len=len(V4_PACKET)) + V4_PACKET),
    ("request without a packet", header(type_=1, count=0, payload_len=0)),
    ("request, not an IP packet", header(type_=1, count=0, payload_len=40) + b"\x50" + bytes(39)),
    ("request, IPv4 shorter than its header", header(type_=1, count=0, payload_len=19)
     + V4_PACKET[:19]),
    ("record flag bit 1", header() + patched(RECORD, 68, b"\x03")),
    ("record padding", header() + patched(RECORD, 75, b"\x01")),
    ("key padding", header() + patched(RECORD, 39, b"\x01")),
    ("removal key padding", header(type_=6, payload_len=REMOVE_LEN)
     + patched(REMOVAL, 37, b"\x01")),
    ("state record in a clean", header(type_=7) + RECORD),
    ("clean records in a push", header(payload_len=CLEAN_LEN) + CLEANING),
    ("clean, bucket = table size",
     clean_header() + patched(CLEANING, 24, struct.pack("!I", 65537))),
    ("clean, bucket above table size", clean_header() + patched(CLEANING, 24, b"\xff" * 4)),
    ("clean, table size 0", clean_header() + patched(CLEANING, 20, bytes(4))),
    ("clean, proto 1", clean_header() + patched(CLEANING, 16, b"\x01")),
    ("clean, proto 0", clean_header() + patched(CLEANING, 16, b"\x00")),
    ("clean, pad byte set", clean_header() + patched(CLEANING, 17, b"\x01")),
    ("clean, second record bad", clean_header(2) + CLEANING + patched(CLEANING, 17, b"\x80")),
]


@pytest.mark.parametrize("data", [d for _, d in MALFORMED], ids=[n for n, _ in MALFORMED])
def test_malformed(data):
    with pytest.raises(PeerError) as caught:
        decode(data, None)
    assert caught.value.reason == "malformed"
    assert isinstance(caught.value, PylbError)


def test_the_independent_header_packer_agrees():
    # So the MALFORMED table is built on a valid message, not on an accident.
    assert decode(header() + RECORD, None) == Message(MessageType.STATE_PUSH, SENDER, VIEW, 1,
                                                      PUSH.records)


BAD_MAC = [
    ("no HMAC", encode(PUSH, None), KEY),
    ("other key", encode(PUSH, OTHER_KEY), KEY),
    ("HMAC zeroed", encode(PUSH, KEY)[:-MAC_LEN] + bytes(MAC_LEN), KEY),
    ("HMAC of another message", encode(PUSH, KEY)[:-MAC_LEN] + encode(REMOVE, KEY)[-MAC_LEN:], KEY),
]


@pytest.mark.parametrize("data, key", [c[1:] for c in BAD_MAC], ids=[c[0] for c in BAD_MAC])
def test_bad_mac(data, key):
    with pytest.raises(PeerError) as caught:
        decode(data, key)
    assert caught.value.reason == "bad_mac"


# Header bytes that decide the structure (magic, version, type, flags, count,
# payload_len, reserved): a flip there may still leave a valid structure (a
# push turned answer), which the MAC then refuses.
STRUCTURAL = set(range(0, 8)) | set(range(32, HEADER_LEN))


@pytest.mark.parametrize("msg", [PUSH, MESSAGES[0][1], REMOVE, CLEAN, CARRIER_QUERY, NOT_HERE],
                         ids=["push", "request", "remove", "clean", "carrier query", "not here"])
def test_every_bit_flip_in_a_keyed_message_is_refused(msg):
    data = encode(msg, KEY)
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << bit % 8
        with pytest.raises(PeerError) as caught:
            decode(bytes(flipped), KEY)
        expected = {"malformed", "bad_mac"} if bit // 8 in STRUCTURAL else {"bad_mac"}
        assert caught.value.reason in expected, bit


def decodes_or_refuses(data: bytes, key: bytes | None) -> None:
    try:
        assert isinstance(decode(data, key), Message)
    except PeerError as err:
        assert err.reason in ("malformed", "bad_mac")


@settings(max_examples=500)
@given(st.binary(max_size=400), st.sampled_from(KEYS))
def test_arbitrary_bytes_decode_or_raise_peer_error(data, key):
    decodes_or_refuses(data, key)


@settings(max_examples=500)
@given(st.integers(0, 12), st.integers(0, 7), st.integers(0, 4), st.integers(0, 2 * RECORD_LEN + 2),
       st.binary(max_size=2 * RECORD_LEN + 2), st.sampled_from(KEYS))
def test_plausible_headers_decode_or_raise_peer_error(type_, flags, count, payload_len, payload,
                                                      key):
    # Random bytes rarely pass the magic; these reach the length and record checks.
    decodes_or_refuses(header(type_, count, payload_len, flags=flags) + payload, key)


@settings(max_examples=200)
@given(st.lists(st.tuples(st.binary(min_size=37, max_size=37), st.ip_addresses(),
                          st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.booleans()),
                max_size=3), st.sampled_from(KEYS))
def test_any_valid_records_round_trip(fields, key):
    records = tuple(StateRecord(k + bytes(3), backend, version, idle, closing)
                    for k, backend, version, idle, closing in fields)
    msg = Message(MessageType.HANDOFF, SENDER, VIEW, 9, records)
    assert decode(encode(msg, key), key) == msg


def test_a_v4_mapped_backend_is_the_ipv4_one():
    record = StateRecord(V4_KEY, ipaddress.ip_address("::ffff:10.0.0.2"), 1, 0, False)
    assert record.backend == ipaddress.IPv4Address("10.0.0.2")


IP_OVERHEAD = {4: 20 + 8, 6: 40 + 8}


@pytest.mark.parametrize("key", KEYS, ids=["plain", "keyed"])
@pytest.mark.parametrize("ip_version", [4, 6])
@pytest.mark.parametrize("mtu", [1500, 9000])
@pytest.mark.parametrize("type_, records", [
    (MessageType.STATE_PUSH, [state(i, v6=i % 3 == 0) for i in range(1000)]),
    (MessageType.REMOVE, [remove(i) for i in range(1000)]),
    (MessageType.CLEAN, [clean(i, v6=i % 2 == 0) for i in range(1000)]),
    (MessageType.CARRIER_QUERY, [query(i) for i in range(1000)]),
    (MessageType.CARRIER_REPLY, [reply(i) for i in range(1000)]),
], ids=["push", "remove", "clean", "query", "reply"])
def test_batches_fit_the_mtu_and_lose_nothing(type_, records, mtu, ip_version, key):
    seqs = itertools.count(100)
    batches = encode_batches(type_, SENDER, VIEW, lambda: next(seqs), records, mtu, ip_version, key)
    record_len = RECORD_LENS[type(records[0])]
    decoded = [decode(d, key) for d in batches]
    for i, data in enumerate(batches):
        assert IP_OVERHEAD[ip_version] + len(data) <= mtu
        if i < len(batches) - 1:    # full: one more record would not have fitted
            assert IP_OVERHEAD[ip_version] + len(data) + record_len > mtu
    assert [m.seq for m in decoded] == list(range(100, 100 + len(batches)))
    assert all(m.type == type_ and m.sender == SENDER and m.view == VIEW for m in decoded)
    assert [r for m in decoded for r in m.records] == records


@pytest.mark.parametrize("type_, ip_version, keyed, expected", [
    # The doc's figure: 18 state records a message at 1500, whatever the family or key.
    (MessageType.STATE_PUSH, 4, False, 18), (MessageType.STATE_PUSH, 4, True, 18),
    (MessageType.STATE_PUSH, 6, False, 18), (MessageType.STATE_PUSH, 6, True, 18),
    (MessageType.REMOVE, 4, True, 29), (MessageType.REMOVE, 6, True, 28),
    (MessageType.CLEAN, 4, False, 50), (MessageType.CLEAN, 4, True, 50),
    (MessageType.CLEAN, 6, False, 50), (MessageType.CLEAN, 6, True, 49),
    (MessageType.CARRIER_QUERY, 4, True, 35), (MessageType.CARRIER_QUERY, 6, True, 34),
    (MessageType.CARRIER_REPLY, 4, True, 18), (MessageType.CARRIER_REPLY, 6, True, 18),
])
def test_records_per_message_at_1500(type_, ip_version, keyed, expected):
    assert peer.records_per_message(type_, 1500, ip_version, keyed) == expected


def test_batching_edges():
    def seq():
        raise AssertionError("no datagram, no seq")
    assert encode_batches(MessageType.REFRESH, SENDER, VIEW, seq, [], 1500, 4, KEY) == []
    with pytest.raises(ValueError):
        encode_batches(MessageType.STATE_REQUEST, SENDER, VIEW, lambda: 1, [state(1)], 1500, 4,
                       None)
    answers = encode_batches(MessageType.STATE_ANSWER, SENDER, VIEW, lambda: 1,
                             [state(i) for i in range(19)], 1500, 4, KEY)
    assert [len(decode(d, KEY).records) for d in answers] == [18, 1]
    with pytest.raises(ValueError):
        encode_batches(MessageType.STATE_PUSH, SENDER, VIEW, lambda: 1, [state(1)], 187, 6, KEY)
    assert len(encode_batches(MessageType.STATE_PUSH, SENDER, VIEW, lambda: 1, [state(1)], 188, 6,
                              KEY)) == 1
    with pytest.raises(ValueError):
        encode_batches(MessageType.STATE_PUSH, SENDER, VIEW, lambda: 1, [state(1)], 1500, 5, KEY)


INVALID = [
    ("request without a packet",
     lambda: Message(MessageType.STATE_REQUEST, SENDER, VIEW, 1, (), None)),
    ("request, packet shorter than an IP header",
     lambda: Message(MessageType.STATE_REQUEST, SENDER, VIEW, 1, (), b"\x45" + bytes(10))),
    ("request with a record",
     lambda: Message(MessageType.STATE_REQUEST, SENDER, VIEW, 1, (state(1),), V4_PACKET)),
    ("answer without a record", lambda: Message(MessageType.STATE_ANSWER, SENDER, VIEW, 1, ())),
    ("push of removals", lambda: Message(MessageType.STATE_PUSH, SENDER, VIEW, 1, (remove(1),))),
    ("remove of states", lambda: Message(MessageType.REMOVE, SENDER, VIEW, 1, (state(1),))),
    ("clean of states", lambda: Message(MessageType.CLEAN, SENDER, VIEW, 1, (state(1),))),
    ("clean of removals", lambda: Message(MessageType.CLEAN, SENDER, VIEW, 1, (remove(1),))),
    ("clean mixing record classes",
     lambda: Message(MessageType.CLEAN, SENDER, VIEW, 1, (clean(1), remove(1), clean(2)))),
    ("push of cleans", lambda: Message(MessageType.STATE_PUSH, SENDER, VIEW, 1, (clean(1),))),
    ("refresh mixing record classes",
     lambda: Message(MessageType.REFRESH, SENDER, VIEW, 1, (state(1), clean(1)))),
    ("clean payload over 65535 bytes",
     lambda: Message(MessageType.CLEAN, SENDER, VIEW, 1, (clean(1),) * 2341)),
    ("push with a packet", lambda: Message(MessageType.STATE_PUSH, SENDER, VIEW, 1, (), V4_PACKET)),
    ("payload over 65535 bytes",
     lambda: Message(MessageType.STATE_PUSH, SENDER, VIEW, 1, (state(1),) * 863)),
    ("unknown type", lambda: Message(12, SENDER, VIEW, 1, ())),
    ("retry on a push", lambda: Message(MessageType.STATE_PUSH, SENDER, VIEW, 1, (), retry=True)),
    ("carrier query without a flow", lambda: Message(MessageType.CARRIER_QUERY, SENDER, VIEW, 1)),
    ("carrier reply without a flow", lambda: Message(MessageType.CARRIER_REPLY, SENDER, VIEW, 1)),
    ("carrier query of states",
     lambda: Message(MessageType.CARRIER_QUERY, SENDER, VIEW, 1, (state(1),))),
    ("carrier reply of queries",
     lambda: Message(MessageType.CARRIER_REPLY, SENDER, VIEW, 1, (query(1),))),
    ("not here in a push",
     lambda: Message(MessageType.STATE_PUSH, SENDER, VIEW, 1, (NotCarried(V4_KEY),))),
    ("query, short key", lambda: FlowQuery(V4_KEY[:39])),
    ("not here, key padding", lambda: NotCarried(V4_KEY[:39] + b"\1")),
    ("sender over 32 bits", lambda: Message(MessageType.STATE_PUSH, 2**32, VIEW, 1, ())),
    ("negative seq", lambda: Message(MessageType.STATE_PUSH, SENDER, VIEW, -1, ())),
    ("view field over 32 bits", lambda: View(2**32, 0, 0)),
    ("short key", lambda: StateRecord(V4_KEY[:39], ipaddress.ip_address("10.0.0.1"), 1, 0, False)),
    ("key padding", lambda: StateRecord(V4_KEY[:39] + b"\1", ipaddress.ip_address("10.0.0.1"), 1,
                                        0, False)),
    ("idle over 32 bits",
     lambda: StateRecord(V4_KEY, ipaddress.ip_address("10.0.0.1"), 1, 2**32, False)),
    ("version over 64 bits", lambda: RemoveRecord(V4_KEY, 2**64)),
    ("clean, VIP not an address", lambda: CleanRecord("192.0.2", 6, 80, 251, 0)),
    ("clean, proto 1", lambda: CleanRecord("192.0.2.10", 1, 80, 251, 0)),
    ("clean, proto as a string", lambda: CleanRecord("192.0.2.10", "6", 80, 251, 0)),
    ("clean, port over 16 bits", lambda: CleanRecord("192.0.2.10", 6, 65536, 251, 0)),
    ("clean, negative port", lambda: CleanRecord("192.0.2.10", 6, -1, 251, 0)),
    ("clean, table size 0", lambda: CleanRecord("192.0.2.10", 6, 80, 0, 0)),
    ("clean, table size over 32 bits", lambda: CleanRecord("192.0.2.10", 6, 80, 2**32, 0)),
    ("clean, bucket = table size", lambda: CleanRecord("192.0.2.10", 6, 80, 251, 251)),
    ("clean, negative bucket", lambda: CleanRecord("192.0.2.10", 6, 80, 251, -1)),
    ("creation time into bit 63", lambda: make_version(2**47, 0)),
    ("counter over 16 bits", lambda: make_version(0, 2**16)),
]


@pytest.mark.parametrize("build", [b for _, b in INVALID], ids=[n for n, _ in INVALID])
def test_invalid_messages_cannot_be_built(build):
    with pytest.raises(ValueError):
        build()


def test_make_version_orders_by_creation_then_counter():
    assert make_version(0x0123456789AB, 3) == 0x0123456789AB0003
    assert make_version(1000, 0xFFFF) < make_version(1001, 0)


# (sender, seq, accepted) in arrival order, one window for the whole sequence.
REPLAY_CASES = [
    ("in order", [(1, s, True) for s in range(1, 200)]),
    ("reordered within 64", [(1, 100, True), (1, 40, True), (1, 37, True), (1, 99, True),
                             (1, 36, False), (1, 101, True), (1, 38, True)]),
    ("duplicates", [(1, 5, True), (1, 5, False), (1, 6, True), (1, 5, False), (1, 6, False)]),
    ("older than 64", [(1, 10, True), (1, 200, True), (1, 137, True), (1, 136, False),
                       (1, 10, False)]),
    ("a jump of exactly 64", [(1, 10, True), (1, 74, True), (1, 10, False), (1, 11, True)]),
    ("a long jump forgets the old bits", [(1, 1, True), (1, 2, True), (1, 1000, True),
                                          (1, 2, False), (1, 999, True), (1, 999, False),
                                          (1, 1000, False)]),
    ("seq 0 and the top of the range", [(1, 0, True), (1, 0, False), (1, 2**64 - 1, True),
                                        (1, 2**64 - 2, True), (1, 2**64 - 1, False)]),
    ("senders are independent", [(1, 10, True), (2, 10, True), (1, 10, False), (2, 500, True),
                                 (1, 11, True), (2, 11, False), (3, 11, True)]),
]


@pytest.mark.parametrize("steps", [c[1] for c in REPLAY_CASES], ids=[c[0] for c in REPLAY_CASES])
def test_replay_window(steps):
    window = ReplayWindow()
    assert [window.check_and_update(sender, seq) for sender, seq, _ in steps] == \
        [accepted for _, _, accepted in steps]


@given(st.lists(st.integers(0, 300), max_size=200))
def test_replay_window_matches_its_definition(seqs):
    window, seen = ReplayWindow(), set()
    for seq in seqs:
        # Accepted once, if above the highest seen or within the 64 below it.
        expected = seq not in seen and (not seen or seq > max(seen) - ReplayWindow.SIZE)
        assert window.check_and_update(7, seq) == expected
        seen |= {seq} if expected else set()


def test_a_forged_message_cannot_advance_the_window():
    window = ReplayWindow()

    def receive(data: bytes) -> bool:
        msg = decode(data, KEY)         # rules 2 and 3 first, then the window
        return window.check_and_update(msg.sender, msg.seq)

    forged = encode(Message(MessageType.REMOVE, SENDER, VIEW, 10**6, ()), OTHER_KEY)
    with pytest.raises(PeerError, match="bad_mac"):
        receive(forged)
    genuine = encode(Message(MessageType.REMOVE, SENDER, VIEW, 1, ()), KEY)
    assert receive(genuine)
    assert not receive(genuine)


def test_seq_counter_increases_across_restarts():
    now = [1_700_000_000 * 10**9]
    first = peer.SeqCounter(lambda: now[0])
    earlier = [first() for _ in range(1000)]
    assert earlier == sorted(set(earlier))
    now[0] += 10**6                     # restarted a millisecond later
    assert peer.SeqCounter(lambda: now[0])() > earlier[-1]


@pytest.mark.parametrize("names", [["lb-1", "lb-2", "lb-3"], ["lb-3", "lb-1", "lb-2"],
                                   ("lb-2", "lb-3", "lb-1", "lb-1"),
                                   {"lb-2": 1, "lb-3": 2, "lb-1": 3}])
def test_view_of_is_order_independent(names):
    # Pasted once from the reference: pins the seed and the join of the doc.
    assert view_of(names, 4, 9) == View(4, 0x2383A3F3, 9)


@pytest.mark.parametrize("names", [["lb-1", "lb-2"], ["lb-1", "lb-2", "lb-3", "lb-4"],
                                   ["lb-1", "lb-2", "lb-4"], ["lb-1", "lb-2", "lb-3 "],
                                   ["lb-1", "lb-23"]])
def test_view_of_changes_with_the_set(names):
    assert view_of(names, 4, 9).member_hash != view_of(["lb-1", "lb-2", "lb-3"], 4, 9).member_hash


def test_view_of_refuses_a_newline_in_a_name():
    with pytest.raises(ValueError):
        view_of(["lb-1\nlb-2", "lb-3"], 1, 1)


def test_balancer_id():
    assert peer.balancer_id("lb-1") == 0x8DBBBBC1
    assert peer.balancer_id("lb-1") == hash_bytes(b"lb-1", peer.HASH_SEED) & 0xFFFFFFFF
    assert peer.balancer_id("lb-2") == 0xC9A947F3


def test_peer_stats():
    stats = peer.PeerStats()
    for reason in ("accepted", "accepted", "spoofed", "malformed", "bad_mac", "replayed"):
        stats.count(reason)
    stats.count("stale", 3)
    stats.count("view_mismatch")
    assert stats.received == 6
    assert stats.as_dict() == dict(accepted=2, spoofed=1, malformed=1, bad_mac=1, replayed=1,
                                   bad_backend=0, stale=3, view_mismatch=1, wrong_lane=0)
    with pytest.raises(ValueError):
        stats.count("bad-mac")


@pytest.mark.parametrize("vip, expected", [
    ("192.0.2.10", ipaddress.IPv4Address("192.0.2.10")),
    ("::ffff:192.0.2.10", ipaddress.IPv4Address("192.0.2.10")),
    (ipaddress.IPv6Address("::ffff:192.0.2.10"), ipaddress.IPv4Address("192.0.2.10")),
    ("2001:db8::10", ipaddress.IPv6Address("2001:db8::10")),
])
def test_a_clean_records_vip_is_normalised(vip, expected):
    # As for backends: the wire cannot tell a v4-mapped VIP from the IPv4 one.
    assert CleanRecord(vip, 6, 80, 251, 0).vip == expected


@pytest.mark.parametrize("table_size, bucket", [(1, 0), (2**32 - 1, 2**32 - 2), (65537, 65536)])
def test_clean_record_edges_round_trip(table_size, bucket):
    msg = Message(MessageType.CLEAN, SENDER, VIEW, 1,
                  (CleanRecord("2001:db8::10", 17, 65535, table_size, bucket),))
    assert decode(encode(msg, KEY), KEY) == msg


def test_clean_batches_at_1500_over_ipv4_with_a_key():
    records = [clean(i) for i in range(120)]
    seqs = itertools.count(1)
    batches = encode_batches(MessageType.CLEAN, SENDER, VIEW, lambda: next(seqs), records, 1500, 4,
                             KEY)
    per_message = peer.records_per_message(MessageType.CLEAN, 1500, 4, True)
    decoded = [decode(d, KEY) for d in batches]
    assert [len(m.records) for m in decoded] == [per_message, per_message, 120 - 2 * per_message]
    assert len(batches[0]) == HEADER_LEN + per_message * CLEAN_LEN + MAC_LEN
    assert IP_OVERHEAD[4] + len(batches[0]) + CLEAN_LEN > 1500     # a full datagram
    assert [r for m in decoded for r in m.records] == records


@st.composite
def clean_records(draw) -> CleanRecord:
    table_size = draw(st.integers(1, 2**32 - 1))
    return CleanRecord(draw(st.ip_addresses()), draw(st.sampled_from([6, 17])),
                       draw(st.integers(0, 65535)), table_size,
                       draw(st.integers(0, table_size - 1)))


@settings(max_examples=200)
@given(st.lists(clean_records(), max_size=4), st.sampled_from(KEYS))
def test_any_valid_clean_records_round_trip(records, key):
    msg = Message(MessageType.CLEAN, SENDER, VIEW, 9, records)
    assert decode(encode(msg, key), key) == msg


def test_headers_only_is_flag_bit_1_of_a_request():
    msg = Message(MessageType.STATE_REQUEST, SENDER, VIEW, 1, (), V4_PACKET, headers_only=True)
    assert struct.unpack_from("!H", encode(msg, None), 6)[0] == 0x0002
    assert struct.unpack_from("!H", encode(msg, KEY), 6)[0] == 0x0003
    with pytest.raises(ValueError):
        Message(MessageType.STATE_PUSH, SENDER, VIEW, 1, (), headers_only=True)


@pytest.mark.parametrize("ip_version, keyed, largest", [
    (4, False, 1500 - 20 - 8 - 48), (4, True, 1500 - 20 - 8 - 48 - 16),
    (6, False, 1500 - 40 - 8 - 48), (6, True, 1500 - 40 - 8 - 48 - 16)])
def test_request_fits_up_to_the_mtu(ip_version, keyed, largest):
    assert peer.request_fits(largest, 1500, ip_version, keyed)
    assert not peer.request_fits(largest + 1, 1500, ip_version, keyed)

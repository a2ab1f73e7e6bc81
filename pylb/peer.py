"""The peer protocol: the datagrams balancers exchange flow state with.

The wire format and the acceptance rules are docs/peer-protocol.md; this is
their one implementation. A receiver applies the rules in order:

1. the IP source and the sender id belong to one configured balancer (the
   caller, which knows the cluster);
2. `decode` checks the structure (`malformed`), then the HMAC (`bad_mac`);
3. `ReplayWindow.check_and_update` checks seq (`replayed`).

Because the MAC is checked before the window is consulted, a forged or
corrupted message can never advance a sender's window and so can never make
its genuine messages look replayed.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import hmac
import ipaddress
import struct
import time
from typing import Callable, Iterable

from pylb.errors import PylbError
from pylb.flow_id import IPAddress, address16, hash_bytes, packed16

MAGIC = 0x504C4250          # "PLBP"
VERSION = 1
DEFAULT_PORT = 4800
HEADER_LEN = 48
RECORD_LEN = 76
REMOVE_LEN = 48
CLEAN_LEN = 28
QUERY_LEN = 40              # a CARRIER_QUERY record: the flow key
MAC_LEN = 16
HISTORY_PART_LEN = 40       # a HISTORY_ANSWER part's header (docs/peer-protocol.md)
HISTORY_BACKEND_LEN = 20    # a backend entry, before its name
HISTORY_GROUP_LEN = 12      # a bucket group, before its buckets (4 bytes each)
NO_PREVIOUS = 0xFFFF        # a bucket group whose buckets had no backend before
# The seed of balancer ids and of the member hash. Fixed by the protocol: every
# balancer must derive the same id from the same name.
HASH_SEED = MAGIC

FLAG_HMAC = 0x0001
# STATE_REQUEST only: the payload is the packet's IP and transport headers
# (lengths rewritten to match); the packet itself is too large for a request,
# so the asker keeps it and forwards it when the answer comes.
FLAG_HEADERS_ONLY = 0x0002
# A message's records all belong to flows of one lane key, which it carries, so
# that a balancer with several worker processes steers it whole to the one
# whose flows they are (native/pylb.h, "Lanes"; docs/architecture.md).
LANE_KEYS = 16
LANE_KEY_SHIFT = 60
# STATE_REQUEST only: the asker sent this request's packet to the receiver
# before (a retry). A receiver that keeps the packet already, waiting for the
# flow's state, does not keep it twice.
FLAG_RETRY = 0x0004
_RECORD_CLOSING = 0x01
# CARRIER_REPLY records only: the replier does not carry the flow; backend,
# version and idle are zero.
_RECORD_NOT_CARRIED = 0x02
_U32, _U64 = (1 << 32) - 1, (1 << 64) - 1
_MAX_PAYLOAD = 0xFFFF       # payload_len is 16 bits
_UDP_LEN = 8
_IP_HEADER_LEN = {4: 20, 6: 40}
_ADDRESS_TYPES = (ipaddress.IPv4Address, ipaddress.IPv6Address)
_VIP_PROTOS = (6, 17)           # TCP, UDP: the protocols a VIP can have

_HEADER = struct.Struct("!IBBHIIIIQHHBB10s")
_STATE = struct.Struct("!40s16sQIB7s")
_REMOVE = struct.Struct("!40sQ")
# The pad byte is a field, not "x": a receiver must see it to refuse it non-zero.
_CLEAN = struct.Struct("!16sBBHII")
_HISTORY_PART = struct.Struct("!QHHBBH16sIHH")
_HISTORY_BACKEND = struct.Struct("!16sHBB")
_HISTORY_GROUP = struct.Struct("!HHII")
_HISTORY_UNKNOWN = 0x01     # part flag: the answerer does not know the tables in force itself
_HISTORY_CURRENT = 0x01     # backend flag: in the answerer's current backend list
assert (_HEADER.size, _STATE.size, _REMOVE.size, _CLEAN.size) == \
    (HEADER_LEN, RECORD_LEN, REMOVE_LEN, CLEAN_LEN)
assert (_HISTORY_PART.size, _HISTORY_BACKEND.size, _HISTORY_GROUP.size) == \
    (HISTORY_PART_LEN, HISTORY_BACKEND_LEN, HISTORY_GROUP_LEN)


class MessageType(enum.IntEnum):
    STATE_REQUEST = 1
    STATE_ANSWER = 2
    STATE_PUSH = 3
    HANDOFF = 4
    REFRESH = 5
    REMOVE = 6
    CLEAN = 7
    CARRIER_QUERY = 8
    CARRIER_REPLY = 9
    HISTORY_REQUEST = 10
    HISTORY_ANSWER = 11


# The types encode_batches may split: the others carry one thing each.
BATCH_TYPES = frozenset({MessageType.STATE_ANSWER, MessageType.STATE_PUSH, MessageType.HANDOFF,
                         MessageType.REFRESH, MessageType.REMOVE, MessageType.CLEAN,
                         MessageType.CARRIER_QUERY, MessageType.CARRIER_REPLY})
# The types whose message is an answer or a question about given flows: empty, it means nothing.
_NON_EMPTY_TYPES = frozenset({MessageType.STATE_ANSWER, MessageType.CARRIER_QUERY,
                              MessageType.CARRIER_REPLY})
# The types whose payload is no list of fixed-size records.
_STRUCTURED_TYPES = frozenset({MessageType.STATE_REQUEST, MessageType.HISTORY_REQUEST,
                               MessageType.HISTORY_ANSWER})


class PeerError(PylbError):
    """A received datagram is not a valid message; `reason` is its drop counter."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _malformed(detail: str) -> PeerError:
    return PeerError("malformed", detail)


def _check_range(name: str, value: int, high: int, low: int = 0) -> None:
    if not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer {low}..{high}, not {value!r}")


@functools.lru_cache(maxsize=4096)     # asked per datagram, for a handful of names
def balancer_id(name: str) -> int:
    """The 32-bit id a balancer signs its messages with (the header's sender)."""
    return hash_bytes(name.encode(), HASH_SEED) & _U32


@dataclasses.dataclass(frozen=True)
class View:
    """What a sender believes the cluster is: balancer set and table generation."""

    member_gen: int
    member_hash: int
    table_gen: int

    def __post_init__(self) -> None:
        _check_range("member_gen", self.member_gen, _U32)
        _check_range("member_hash", self.member_hash, _U32)
        _check_range("table_gen", self.table_gen, _U32)


def view_of(balancer_names: Iterable[str], member_gen: int, table_gen: int) -> View:
    """The view of a balancer set; the hash depends on the set, not its order."""
    names = sorted(set(balancer_names))
    if any("\n" in name for name in names):
        # "\n" separates the names: one inside a name would make two sets hash alike.
        raise ValueError("a balancer name cannot contain a newline")
    member_hash = hash_bytes("\n".join(names).encode(), HASH_SEED) & _U32
    return View(member_gen, member_hash, table_gen)


def make_version(created_ms: int, counter: int) -> int:
    """A record version: creation time (wall-clock ms), then an update counter,
    so versions of one flow only grow. Bit 63 is left to the caller: it marks
    state from the balancer that saw the flow start (docs/peer-protocol.md)."""
    _check_range("created_ms", created_ms, (1 << 47) - 1)
    _check_range("counter", counter, 0xFFFF)
    return (created_ms << 16) | counter


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != 40:
        raise ValueError(f"a flow key is 40 bytes (FlowKey.to_bytes()), not {key!r}")
    if key[37:] != b"\0\0\0":
        raise ValueError("the last 3 bytes of a flow key are zero")


_BACKENDS: dict[bytes, IPAddress] = {}


def _backend_address(raw: bytes) -> IPAddress:
    """A backend's address object, one per address: a VIP has few backends
    and an owner holds a record for each of millions of flows."""
    address = _BACKENDS.get(raw)
    if address is None:
        if len(_BACKENDS) >= 65536:
            _BACKENDS.clear()       # bounded whatever peers send
        address = _BACKENDS[raw] = address16(raw)
    return address


def _record_address(value) -> IPAddress:
    # An address object as it is: ip_address() would print and parse it again.
    address = value if isinstance(value, _ADDRESS_TYPES) else ipaddress.ip_address(value)
    # The wire cannot tell ::ffff:a.b.c.d from a.b.c.d; both mean the IPv4 address.
    return getattr(address, "ipv4_mapped", None) or address


@dataclasses.dataclass(frozen=True, slots=True)     # an owner holds millions
class StateRecord:
    """A flow's state: its backend, and how fresh the sender's knowledge is."""

    key: bytes          # FlowKey.to_bytes()
    backend: IPAddress
    version: int        # make_version(); a holder never replaces a newer one
    idle_ms: int        # since the sender last saw a packet of the flow
    closing: bool       # FIN or RST seen

    def __post_init__(self) -> None:
        _check_key(self.key)
        object.__setattr__(self, "backend", _record_address(self.backend))
        _check_range("version", self.version, _U64)
        _check_range("idle_ms", self.idle_ms, _U32)
        object.__setattr__(self, "closing", bool(self.closing))


@dataclasses.dataclass(frozen=True, slots=True)
class RemoveRecord:
    """A flow ended (FIN/RST or idle) at the version given."""

    key: bytes
    version: int

    def __post_init__(self) -> None:
        _check_key(self.key)
        _check_range("version", self.version, _U64)


@dataclasses.dataclass(frozen=True)
class CleanRecord:
    """A bucket of a VIP that its primary owner declares retired: changed
    longer ago than the retirement period, and no live flow in it still needs
    a backend other than the bucket's current one (docs/peer-protocol.md)."""

    vip: IPAddress
    proto: int          # 6 or 17
    port: int           # 0: the all-ports VIP
    table_size: int     # the VIP's table size, as the sender knows it
    bucket: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "vip", _record_address(self.vip))
        if not isinstance(self.proto, int) or self.proto not in _VIP_PROTOS:
            raise ValueError(f"proto must be 6 (TCP) or 17 (UDP), not {self.proto!r}")
        _check_range("port", self.port, 0xFFFF)
        _check_range("table_size", self.table_size, _U32, low=1)
        _check_range("bucket", self.bucket, self.table_size - 1)


@dataclasses.dataclass(frozen=True, slots=True)
class FlowQuery:
    """An owner without a flow's state asks whether the receiver carries it."""

    key: bytes

    def __post_init__(self) -> None:
        _check_key(self.key)


@dataclasses.dataclass(frozen=True, slots=True)
class NotCarried:
    """The reply to a FlowQuery from a balancer that has no state for the flow
    (the other reply is the StateRecord it has)."""

    key: bytes

    def __post_init__(self) -> None:
        _check_key(self.key)


@dataclasses.dataclass(frozen=True)
class HistoryBackend:
    """A backend a HISTORY_ANSWER names: one of the answerer's current
    backend list (in its order, with the weight its table is built from), or
    the previous backend of some stateful bucket."""

    address: IPAddress
    name: str
    weight: int         # in the answerer's current table; 0 for one not in it
    current: bool       # in the answerer's current backend list

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", _record_address(self.address))
        if not isinstance(self.name, str) or not 1 <= len(self.name.encode()) <= 255:
            raise ValueError(f"a backend name is 1..255 bytes of UTF-8, not {self.name!r}")
        _check_range("weight", self.weight, 0xFFFF)
        object.__setattr__(self, "current", bool(self.current))

    @property
    def wire_len(self) -> int:
        return HISTORY_BACKEND_LEN + len(self.name.encode())


@dataclasses.dataclass(frozen=True)
class BucketGroup:
    """Stateful buckets of a VIP that share their previous backend (an index
    into the VIP's backend entries, or NO_PREVIOUS) and the age of their last
    move, in ms at the answerer."""

    previous: int
    age_ms: int
    buckets: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_range("previous", self.previous, NO_PREVIOUS)
        _check_range("age_ms", self.age_ms, _U32)
        object.__setattr__(self, "buckets", tuple(self.buckets))
        if not self.buckets:
            raise ValueError("a bucket group has at least one bucket")
        for b in self.buckets:
            _check_range("bucket", b, _U32)
        if any(a >= b for a, b in zip(self.buckets, self.buckets[1:])):
            raise ValueError("a bucket group's buckets are strictly ascending")

    @property
    def wire_len(self) -> int:
        return HISTORY_GROUP_LEN + 4 * len(self.buckets)


@dataclasses.dataclass(frozen=True)
class HistoryPart:
    """One datagram of a HISTORY_ANSWER (pylb/history.py): part `part` of
    `parts` answering the HISTORY_REQUEST whose seq is `answers`. It carries
    backend entries and bucket groups of one VIP; a VIP's entries are
    numbered across the parts in order. `unknown`: the answerer does not
    know the tables in force itself (one part, no VIP)."""

    answers: int
    part: int
    parts: int
    unknown: bool = False
    vip: IPAddress | None = None    # None: no VIP (an unknown answer, or one with no VIPs)
    proto: int = 0
    port: int = 0
    table_size: int = 0
    backends: tuple[HistoryBackend, ...] = ()
    groups: tuple[BucketGroup, ...] = ()

    def __post_init__(self) -> None:
        _check_range("answers", self.answers, _U64)
        _check_range("parts", self.parts, 0xFFFF, low=1)
        _check_range("part", self.part, self.parts - 1)
        object.__setattr__(self, "backends", tuple(self.backends))
        object.__setattr__(self, "groups", tuple(self.groups))
        if not all(isinstance(b, HistoryBackend) for b in self.backends) \
                or not all(isinstance(g, BucketGroup) for g in self.groups):
            raise ValueError("a history part carries HistoryBackends and BucketGroups")
        if self.vip is None:
            if self.proto or self.port or self.table_size or self.backends or self.groups:
                raise ValueError("a history part without a VIP carries nothing else")
        else:
            object.__setattr__(self, "vip", _record_address(self.vip))
            if self.proto not in _VIP_PROTOS:
                raise ValueError(f"proto must be 6 (TCP) or 17 (UDP), not {self.proto!r}")
            _check_range("port", self.port, 0xFFFF)
            _check_range("table_size", self.table_size, _U32, low=1)
            if any(g.buckets[-1] >= self.table_size for g in self.groups):
                raise ValueError("a bucket is not below the table size")
        if self.unknown and (self.vip is not None or self.parts != 1):
            raise ValueError("an unknown answer is one part without a VIP")
        if len(self.backends) + len(self.groups) > 0xFFFF:
            raise ValueError("too many entries for one part")

    @property
    def wire_len(self) -> int:
        return HISTORY_PART_LEN + sum(b.wire_len for b in self.backends) \
            + sum(g.wire_len for g in self.groups)


_RECORD_CLASS = {MessageType.REMOVE: (RemoveRecord,), MessageType.CLEAN: (CleanRecord,),
                 MessageType.CARRIER_QUERY: (FlowQuery,),
                 MessageType.CARRIER_REPLY: (StateRecord, NotCarried)}
_RECORD_LEN = {MessageType.REMOVE: REMOVE_LEN, MessageType.CLEAN: CLEAN_LEN,
               MessageType.CARRIER_QUERY: QUERY_LEN}


def _record_classes(type_: MessageType) -> tuple[type, ...]:
    if type_ == MessageType.STATE_REQUEST:
        return ()
    return _RECORD_CLASS.get(type_, (StateRecord,))


def _record_len(type_: MessageType) -> int:
    return _RECORD_LEN.get(type_, RECORD_LEN)


def lane_key(flow_id: int) -> int:
    """The lane key of a flow: the top 4 bits of its id."""
    return flow_id >> LANE_KEY_SHIFT


def _is_ip_packet(packet: bytes) -> bool:
    # The receiver re-parses the packet by its version nibble; a request that
    # cannot hold an IP header is refused here, not deep in the miss path.
    version = packet[0] >> 4 if packet else 0
    return version in _IP_HEADER_LEN and len(packet) >= _IP_HEADER_LEN[version]


@dataclasses.dataclass(frozen=True)
class Message:
    """One datagram's content. Always valid: a bad one cannot be built."""

    type: MessageType
    sender: int
    view: View
    seq: int
    records: tuple = ()
    packet: bytes | None = None     # STATE_REQUEST only: the client's IP packet
    headers_only: bool = False      # STATE_REQUEST only: packet is its headers (FLAG_HEADERS_ONLY)
    lane_key: int = 0               # the lane key of every flow it carries; 0 for CLEAN
    sender_lane: int = 0            # the sending worker process (its own seq counter)
    retry: bool = False             # STATE_REQUEST only: sent to the receiver before (FLAG_RETRY)
    part: HistoryPart | None = None  # HISTORY_ANSWER only

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", MessageType(self.type))
        object.__setattr__(self, "records", tuple(self.records))
        _check_range("sender", self.sender, _U32)
        _check_range("seq", self.seq, _U64)
        _check_range("lane_key", self.lane_key, LANE_KEYS - 1)
        _check_range("sender_lane", self.sender_lane, LANE_KEYS - 1)
        if not isinstance(self.view, View):
            raise ValueError(f"view must be a View, not {self.view!r}")
        if self.type == MessageType.STATE_REQUEST:
            if self.records or not isinstance(self.packet, bytes) or not _is_ip_packet(self.packet):
                raise ValueError("a STATE_REQUEST carries an IP packet and no records")
            if len(self.packet) > _MAX_PAYLOAD:
                raise ValueError(f"a packet of {len(self.packet)} bytes does not fit a message")
            return
        if self.packet is not None or self.headers_only or self.retry:
            raise ValueError(f"a {self.type.name} carries no packet")
        if (self.part is not None) != (self.type == MessageType.HISTORY_ANSWER):
            raise ValueError("a HISTORY_ANSWER, and it alone, carries a HistoryPart")
        if self.type in (MessageType.HISTORY_REQUEST, MessageType.HISTORY_ANSWER):
            if self.records:
                raise ValueError(f"a {self.type.name} carries no records")
            if self.part is not None and (not isinstance(self.part, HistoryPart)
                                          or self.part.wire_len > _MAX_PAYLOAD):
                raise ValueError("a HISTORY_ANSWER carries one HistoryPart that fits a message")
            return
        classes = _record_classes(self.type)
        if not all(isinstance(r, classes) for r in self.records):
            names = " and ".join(f"{c.__name__}s" for c in classes)
            raise ValueError(f"a {self.type.name} carries {names} only")
        if self.type in _NON_EMPTY_TYPES and not self.records:
            raise ValueError(f"a {self.type.name} carries at least one record")
        if len(self.records) * _record_len(self.type) > _MAX_PAYLOAD:
            raise ValueError(f"{len(self.records)} records do not fit a message")


def _payload(msg: Message) -> bytes:
    if msg.type == MessageType.STATE_REQUEST:
        return msg.packet
    if msg.type == MessageType.REMOVE:
        return b"".join(_REMOVE.pack(r.key, r.version) for r in msg.records)
    if msg.type == MessageType.CLEAN:
        return b"".join(_CLEAN.pack(packed16(r.vip), r.proto, 0, r.port, r.table_size, r.bucket)
                        for r in msg.records)
    if msg.type == MessageType.CARRIER_QUERY:
        return b"".join(r.key for r in msg.records)
    if msg.type == MessageType.HISTORY_REQUEST:
        return b""
    if msg.type == MessageType.HISTORY_ANSWER:
        return _history_bytes(msg.part)
    return b"".join(_state_bytes(r) for r in msg.records)


def _count(msg: Message) -> int:
    if msg.part is not None:
        return len(msg.part.backends) + len(msg.part.groups)
    return len(msg.records)


def _history_bytes(p: HistoryPart) -> bytes:
    vip = packed16(p.vip) if p.vip is not None else bytes(16)
    out = [_HISTORY_PART.pack(p.answers, p.part, p.parts, _HISTORY_UNKNOWN if p.unknown else 0,
                              p.proto, p.port, vip, p.table_size, len(p.backends),
                              len(p.groups))]
    for b in p.backends:
        name = b.name.encode()
        out.append(_HISTORY_BACKEND.pack(packed16(b.address), b.weight,
                                         _HISTORY_CURRENT if b.current else 0, len(name)) + name)
    for g in p.groups:
        out.append(_HISTORY_GROUP.pack(g.previous, 0, g.age_ms, len(g.buckets))
                   + struct.pack(f"!{len(g.buckets)}I", *g.buckets))
    return b"".join(out)


def _decode_history(payload: bytes) -> HistoryPart:
    """A HISTORY_ANSWER's part; ValueError where the layout does not hold."""
    if len(payload) < HISTORY_PART_LEN:
        raise ValueError("a history part shorter than its header")
    (answers, part, parts, flags, proto, port, vip, table_size, n_backends,
     n_groups) = _HISTORY_PART.unpack_from(payload)
    if flags & ~_HISTORY_UNKNOWN:
        raise ValueError("unknown history part flags")
    at, backends, groups = HISTORY_PART_LEN, [], []
    for _ in range(n_backends):
        if at + HISTORY_BACKEND_LEN > len(payload):
            raise ValueError("a backend entry past the payload")
        address, weight, bflags, name_len = _HISTORY_BACKEND.unpack_from(payload, at)
        at += HISTORY_BACKEND_LEN
        name = payload[at:at + name_len]
        at += name_len
        if bflags & ~_HISTORY_CURRENT or len(name) != name_len:
            raise ValueError("a bad backend entry")
        backends.append(HistoryBackend(address16(address), name.decode(), weight,
                                       bool(bflags & _HISTORY_CURRENT)))
    for _ in range(n_groups):
        if at + HISTORY_GROUP_LEN > len(payload):
            raise ValueError("a bucket group past the payload")
        previous, pad, age_ms, n = _HISTORY_GROUP.unpack_from(payload, at)
        at += HISTORY_GROUP_LEN
        if pad or at + 4 * n > len(payload):
            raise ValueError("a bad bucket group")
        groups.append(BucketGroup(previous, age_ms, struct.unpack_from(f"!{n}I", payload, at)))
        at += 4 * n
    if at != len(payload):
        raise ValueError("bytes after the history part's entries")
    has_vip = proto != 0
    if not has_vip and any(vip):
        raise ValueError("a VIP address without a protocol")
    return HistoryPart(answers, part, parts, bool(flags & _HISTORY_UNKNOWN),
                       address16(vip) if has_vip else None, proto, port, table_size,
                       tuple(backends), tuple(groups))


_NOT_CARRIED_TAIL = _STATE.pack(bytes(40), bytes(16), 0, 0, _RECORD_NOT_CARRIED, bytes(7))[40:]


def _state_bytes(r: StateRecord | NotCarried) -> bytes:
    if isinstance(r, NotCarried):
        return r.key + _NOT_CARRIED_TAIL
    return _STATE.pack(r.key, packed16(r.backend), r.version, r.idle_ms,
                       _RECORD_CLOSING if r.closing else 0, bytes(7))


def _mac(key: bytes, signed: bytes) -> bytes:
    # hmac.digest: OpenSSL's one-shot HMAC, without building an hmac object.
    return hmac.digest(key, signed, "sha256")[:MAC_LEN]


def encode(msg: Message, key: bytes | None) -> bytes:
    """The UDP payload of msg; with a key it carries the HMAC trailer."""
    payload = _payload(msg)
    flags = (FLAG_HMAC if key is not None else 0) | (FLAG_HEADERS_ONLY if msg.headers_only else 0) \
        | (FLAG_RETRY if msg.retry else 0)
    header = _HEADER.pack(MAGIC, VERSION, msg.type, flags,
                          msg.sender, msg.view.member_gen, msg.view.member_hash,
                          msg.view.table_gen, msg.seq, _count(msg), len(payload),
                          msg.lane_key, msg.sender_lane, bytes(10))
    signed = header + payload
    return signed + _mac(key, signed) if key is not None else signed


def _payload_room(mtu: int, ip_version: int, keyed: bool) -> int:
    """Payload bytes a datagram whose IP packet is at most mtu can carry."""
    if ip_version not in _IP_HEADER_LEN:
        raise ValueError(f"ip_version is 4 or 6, not {ip_version!r}")
    room = mtu - _IP_HEADER_LEN[ip_version] - _UDP_LEN - HEADER_LEN - (MAC_LEN if keyed else 0)
    return max(0, min(room, _MAX_PAYLOAD))


def payload_room(mtu: int, ip_version: int, keyed: bool) -> int:
    """Payload bytes a datagram whose IP packet is at most mtu can carry (a
    HISTORY_ANSWER part's wire_len must not exceed it)."""
    return _payload_room(mtu, ip_version, keyed)


def records_per_message(type_: MessageType, mtu: int, ip_version: int, keyed: bool) -> int:
    """How many records of type_ fit one datagram whose IP packet is at most mtu."""
    return _payload_room(mtu, ip_version, keyed) // _record_len(MessageType(type_))


def request_fits(packet_len: int, mtu: int, ip_version: int, keyed: bool) -> bool:
    """Whether a STATE_REQUEST carrying a whole packet of packet_len bytes fits
    one datagram whose IP packet is at most mtu."""
    return packet_len <= _payload_room(mtu, ip_version, keyed)


def encode_batches(type_: MessageType, sender: int, view: View, next_seq: Callable[[], int],
                   records: Iterable, mtu: int, ip_version: int,
                   key: bytes | None, lane_key: int = 0, sender_lane: int = 0) -> list[bytes]:
    """records, in order, in as few datagrams as fit the MTU, each with its own
    seq; all of one lane key (the caller groups them)."""
    type_ = MessageType(type_)
    if type_ not in BATCH_TYPES:
        raise ValueError(f"{type_.name} messages are not batched")
    per_message = records_per_message(type_, mtu, ip_version, key is not None)
    if per_message < 1:
        raise ValueError(f"an MTU of {mtu} leaves no room for a {type_.name} record")
    records = tuple(records)
    return [encode(Message(type_, sender, view, next_seq(), records[start:start + per_message],
                           lane_key=lane_key, sender_lane=sender_lane), key)
            for start in range(0, len(records), per_message)]


def decode(data: bytes, key: bytes | None) -> Message:
    """The message in a UDP payload; PeerError("malformed" or "bad_mac") if it is
    not one. With a key the HMAC must be present and right; without one, a
    trailer is skipped unchecked (docs/peer-protocol.md, rule 3)."""
    data = bytes(data)
    if len(data) < HEADER_LEN:
        raise _malformed(f"{len(data)} bytes, shorter than a header")
    (magic, version, type_number, flags, sender, member_gen, member_hash, table_gen, seq, count,
     payload_len, lane, sender_lane, reserved) = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise _malformed(f"magic {magic:#010x}")
    if version != VERSION:
        raise _malformed(f"version {version}")
    try:
        type_ = MessageType(type_number)
    except ValueError:
        raise _malformed(f"type {type_number}") from None
    if flags & ~(FLAG_HMAC | FLAG_HEADERS_ONLY | FLAG_RETRY) or any(reserved):
        raise _malformed("unknown flags or non-zero reserved bytes")
    if lane >= LANE_KEYS or sender_lane >= LANE_KEYS:
        raise _malformed(f"lane key {lane}, sender lane {sender_lane}")
    if flags & (FLAG_HEADERS_ONLY | FLAG_RETRY) and type_ != MessageType.STATE_REQUEST:
        raise _malformed(f"a {type_.name} flagged as a request")
    mac_len = MAC_LEN if flags & FLAG_HMAC else 0
    if len(data) != HEADER_LEN + payload_len + mac_len:
        raise _malformed(f"{len(data)} bytes for a payload of {payload_len}")
    if type_ == MessageType.STATE_REQUEST:
        if count != 0:
            raise _malformed("a STATE_REQUEST with records")
    elif type_ == MessageType.HISTORY_REQUEST:
        if count != 0 or payload_len != 0:
            raise _malformed("a HISTORY_REQUEST with a payload")
    elif type_ == MessageType.HISTORY_ANSWER:
        pass        # its layout is checked once authenticated
    elif payload_len != count * _record_len(type_):
        raise _malformed(f"{count} records in {payload_len} bytes")
    elif type_ in _NON_EMPTY_TYPES and count < 1:
        raise _malformed(f"a {type_.name} without records")

    # Authenticate before looking inside the payload: a forged message is
    # counted as such, and its content is never parsed.
    signed_len = HEADER_LEN + payload_len
    if key is not None:
        if not mac_len:
            raise PeerError("bad_mac", "no HMAC and a key is configured")
        if not hmac.compare_digest(data[signed_len:], _mac(key, data[:signed_len])):
            raise PeerError("bad_mac", "wrong HMAC")

    view = View(member_gen, member_hash, table_gen)
    payload = data[HEADER_LEN:signed_len]
    if type_ == MessageType.STATE_REQUEST:
        if not _is_ip_packet(payload):
            raise _malformed("a STATE_REQUEST without an IP packet")
        return Message(type_, sender, view, seq, (), payload,
                       headers_only=bool(flags & FLAG_HEADERS_ONLY), lane_key=lane,
                       sender_lane=sender_lane, retry=bool(flags & FLAG_RETRY))
    try:
        if type_ == MessageType.HISTORY_ANSWER:
            part = _decode_history(payload)
            if count != len(part.backends) + len(part.groups):
                raise ValueError(f"count {count} for {len(part.backends)} backends and "
                                 f"{len(part.groups)} groups")
            return Message(type_, sender, view, seq, (), lane_key=lane, sender_lane=sender_lane,
                           part=part)
        records = tuple(_decode_records(type_, payload))
    except ValueError as err:
        raise _malformed(str(err)) from None
    return Message(type_, sender, view, seq, records, lane_key=lane, sender_lane=sender_lane)


def _decode_records(type_: MessageType, payload: bytes):
    if type_ == MessageType.REMOVE:
        for key, version in _REMOVE.iter_unpack(payload):
            yield RemoveRecord(key, version)
        return
    if type_ == MessageType.CLEAN:
        for vip, proto, pad, port, table_size, bucket in _CLEAN.iter_unpack(payload):
            if pad:
                raise ValueError("non-zero clean record padding")
            yield CleanRecord(address16(vip), proto, port, table_size, bucket)
        return
    if type_ == MessageType.CARRIER_QUERY:
        for start in range(0, len(payload), QUERY_LEN):
            yield FlowQuery(payload[start:start + QUERY_LEN])
        return
    known = _RECORD_CLOSING | (_RECORD_NOT_CARRIED if type_ == MessageType.CARRIER_REPLY else 0)
    for key, backend, version, idle_ms, flags, pad in _STATE.iter_unpack(payload):
        if flags & ~known or any(pad):
            raise ValueError("unknown record flags or non-zero record padding")
        if flags & _RECORD_NOT_CARRIED:
            # Nothing but the key: a reply that says both would be read two ways.
            if any(backend) or version or idle_ms or flags & _RECORD_CLOSING:
                raise ValueError("a not-carried reply with state")
            yield NotCarried(key)
            continue
        yield StateRecord(key, _backend_address(backend), version, idle_ms,
                          bool(flags & _RECORD_CLOSING))


class SeqCounter:
    """A sender's seq source (a next_seq for encode_batches).

    It starts at the wall clock in nanoseconds, so a restarted balancer goes on
    above the numbers of its previous life: receivers keep their replay
    windows, and a counter restarting at 1 would be dropped as replayed.
    """

    def __init__(self, clock: Callable[[], int] = time.time_ns):
        self._last = clock() & _U64

    def __call__(self) -> int:
        self._last += 1
        return self._last


class ReplayWindow:
    """Per-sender sliding window over seq (as IPsec's, RFC 4303 3.4.3). A
    sender is whatever keeps one seq counter: a balancer's worker process,
    (balancer id, sender lane).

    A seq is accepted once if it is above the sender's highest seen, or within
    the SIZE below it and not seen yet. Feed it only messages `decode` has
    accepted: the window moves on every accepted seq.
    """

    SIZE = 64

    def __init__(self) -> None:
        # sender -> (highest seq seen, bitmap: bit i set = highest - i seen)
        self._senders: dict[int, tuple[int, int]] = {}

    def check_and_update(self, sender: int, seq: int) -> bool:
        """True (and remembered) for a new seq; False for a replayed or too old one."""
        state = self._senders.get(sender)
        if state is None:
            self._senders[sender] = (seq, 1)
            return True
        highest, seen = state
        if seq > highest:
            shift = seq - highest
            seen = (seen << shift | 1) & ((1 << self.SIZE) - 1) if shift < self.SIZE else 1
            self._senders[sender] = (seq, seen)
            return True
        offset = highest - seq
        if offset >= self.SIZE or seen >> offset & 1:
            return False
        self._senders[sender] = (highest, seen | 1 << offset)
        return True


REASONS = ("accepted", "spoofed", "malformed", "bad_mac", "replayed", "bad_backend", "stale",
           "view_mismatch", "wrong_lane")


@dataclasses.dataclass
class PeerStats:
    """Peer-protocol counters by reason.

    Messages: received == accepted + spoofed + malformed + bad_mac + replayed;
    view_mismatch counts accepted messages whose view differed. Records of
    accepted messages: bad_backend, stale and wrong_lane (a flow of another
    worker process of this balancer than its message's lane key said) count
    the ones that changed nothing.
    """

    accepted: int = 0
    spoofed: int = 0
    malformed: int = 0
    bad_mac: int = 0
    replayed: int = 0
    bad_backend: int = 0
    stale: int = 0
    view_mismatch: int = 0
    wrong_lane: int = 0

    def count(self, reason: str, n: int = 1) -> None:
        if reason not in REASONS:
            # A typo must not quietly start a counter nobody reads.
            raise ValueError(f"unknown peer counter {reason!r}")
        setattr(self, reason, getattr(self, reason) + n)

    @property
    def received(self) -> int:
        return self.accepted + self.spoofed + self.malformed + self.bad_mac + self.replayed

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

"""The flow id: Python reference and C shim agree, mix well, and parse keys."""
from __future__ import annotations

import functools
import ipaddress
import random
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pylb.flow_id import FlowKey, bucket, flow_id, hash_bytes, native_flow_id

# Generated once from the reference and pasted: they pin the algorithm of
# docs/flow-id.md, so any change to it shows here first.
VECTORS = [
    ("tcp 198.51.100.7:40000 -> 192.0.2.10:80", 0x0000000000000000, 0x5B12475CEA6D73F5),
    ("udp 203.0.113.5:53 -> 192.0.2.10:53", 0x0000000000000000, 0x342570347CE7E8BE),
    ("tcp 0.0.0.0:0 -> 0.0.0.0:0", 0x0000000000000000, 0x44019D2B7AA5C2A3),
    ("tcp [2001:db8::7]:40000 -> [2001:db8::10]:443", 0x0000000000000000, 0x19F67103FB653D30),
    ("udp [::1]:1 -> [ff02::1]:65535", 0x0000000000000000, 0x8A73A0DB07244B6E),
    ("tcp 198.51.100.7:40000 -> 192.0.2.10:80", 0x0123456789ABCDEF, 0x150B84A9F1212470),
    ("udp 203.0.113.5:53 -> 192.0.2.10:53", 0x0123456789ABCDEF, 0x30358866FD8A0083),
    ("tcp 0.0.0.0:0 -> 0.0.0.0:0", 0x0123456789ABCDEF, 0x709841304F8B8574),
    ("tcp [2001:db8::7]:40000 -> [2001:db8::10]:443", 0x0123456789ABCDEF, 0x60C5BEA78A203745),
    ("udp [::1]:1 -> [ff02::1]:65535", 0x0123456789ABCDEF, 0x7608EA1171AD3FCE),
    ("tcp 198.51.100.7:40000 -> 192.0.2.10:80", 0xFFFFFFFFFFFFFFFF, 0x76A8BF0907BC2AB2),
    ("udp 203.0.113.5:53 -> 192.0.2.10:53", 0xFFFFFFFFFFFFFFFF, 0xD9411B17596F004F),
    ("tcp 0.0.0.0:0 -> 0.0.0.0:0", 0xFFFFFFFFFFFFFFFF, 0xBDBF702C3A2BEB4F),
    ("tcp [2001:db8::7]:40000 -> [2001:db8::10]:443", 0xFFFFFFFFFFFFFFFF, 0x2252C1BB2748C1B5),
    ("udp [::1]:1 -> [ff02::1]:65535", 0xFFFFFFFFFFFFFFFF, 0xBC8E62461F7FBC24),
]

# hash_bytes over strings of other lengths (Maglev's name hash), seed 0.
BYTES_VECTORS = [
    (b"", 0xF490368ABA8BFEAC),
    (b"a", 0x99A94FC94408952F),
    (b"12345678", 0x3A96D9AF1E2D13E8),
    (b"backend-1", 0x8205CE7467155FF4),
]


@pytest.mark.parametrize("text, seed, expected", VECTORS)
def test_fixed_vectors_python(text, seed, expected):
    assert flow_id(FlowKey.parse(text), seed) == expected


@pytest.mark.parametrize("text, seed, expected", VECTORS)
def test_fixed_vectors_native(text, seed, expected):
    assert native_flow_id(FlowKey.parse(text), seed) == expected


@pytest.mark.parametrize("data, expected", BYTES_VECTORS)
def test_hash_bytes_vectors(data, expected):
    assert hash_bytes(data, 0) == expected


def test_key_bytes_layout():
    key = FlowKey.parse("tcp 198.51.100.7:40000 -> 192.0.2.10:80")
    assert key.to_bytes().hex() == (
        "00000000000000000000ffffc6336407"   # src, v4-mapped
        "00000000000000000000ffffc000020a"   # dst
        "409c" "5000" "06" "000000")          # sport 40000, dport 80 (LE), proto, pad


@pytest.mark.skipif(sys.byteorder != "little", reason="struct memory is host order")
def test_key_bytes_are_the_c_struct_on_little_endian_hosts():
    from pylb._ffi import ffi, ip_to_c

    key = FlowKey.parse("udp [2001:db8::7]:40000 -> [2001:db8::10]:53")
    c_key = ffi.new("struct pylb_flow_key *")
    ip_to_c(key.src, c_key.src)
    ip_to_c(key.dst, c_key.dst)
    c_key.sport, c_key.dport, c_key.proto = key.sport, key.dport, key.proto
    assert bytes(ffi.buffer(c_key)) == key.to_bytes()


addresses_v4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
addresses_v6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
ports = st.integers(0, 0xFFFF)


def flow_keys(protos=st.integers(0, 255)):
    return st.one_of(st.builds(FlowKey, addresses_v4, addresses_v4, ports, ports, protos),
                     st.builds(FlowKey, addresses_v6, addresses_v6, ports, ports, protos))


seeds = st.integers(0, 2**64 - 1)


@given(flow_keys(), seeds)
def test_python_and_native_agree(key, seed):
    assert flow_id(key, seed) == native_flow_id(key, seed)


@given(flow_keys(), seeds, seeds)
def test_seed_changes_the_id(key, seed, other_seed):
    # For a fixed key the id is a bijection of the seed (docs/flow-id.md).
    if seed != other_seed:
        assert flow_id(key, seed) != flow_id(key, other_seed)


@given(flow_keys(st.sampled_from([6, 17])))
def test_parse_round_trips(key):
    assert FlowKey.parse(str(key)) == key


def test_bucket_is_the_id_modulo_the_table_size():
    from pylb._ffi import lib

    for flow in (0, 1, 65536, 65537, 2**64 - 1, 0x5B12475CEA6D73F5):
        assert bucket(flow, 65537) == flow % 65537 == lib.pylb_bucket(flow, 65537)


# The fast path's bucket (a multiply by a per-table constant, no division)
# against Python's %: table sizes from 1 to 2**32 - 1, primes among them, and
# flow ids at every edge a fixed-point reduction can get wrong.
_SIZES = [1, 2, 3, 7, 251, 65521, 65537, 131071, 999983, 2**31 - 1, 2**31, 2**32 - 5, 2**32 - 1]


def _edge_ids(m: int) -> list[int]:
    top = 2**64 - 1
    ids = [0, 1, m - 1, m, m + 1, top, top - 1, top - m, 2**63, 2**63 - 1, 2**32, 2**32 - 1]
    ids += [k * m + r for k in (1, 2, top // m - 1, top // m) for r in (0, 1, m - 1) if
            k * m + r <= top]
    return [i for i in ids if 0 <= i <= top]


@pytest.mark.parametrize("m", _SIZES)
def test_fast_bucket_equals_the_modulo(m):
    from pylb._ffi import check, ffi, lib

    rng = random.Random(m)
    ids = _edge_ids(m) + [rng.getrandbits(64) for _ in range(20_000)] \
        + [rng.getrandbits(rng.randrange(1, 64)) for _ in range(5_000)]
    c_ids = ffi.new("uint64_t[]", ids)
    out = ffi.new("uint32_t[]", len(ids))
    check(lib.pylb_bucket_burst(c_ids, len(ids), m, out), "bucket burst")
    assert list(out) == [bucket(i, m) for i in ids] == [i % m for i in ids]


@given(st.integers(0, 2**64 - 1), st.integers(1, 2**32 - 1))
def test_fast_bucket_equals_the_modulo_anywhere(flow, m):
    from pylb._ffi import ffi, lib

    out = ffi.new("uint32_t[]", 1)
    assert lib.pylb_bucket_burst(ffi.new("uint64_t[]", [flow]), 1, m, out) == 0
    assert out[0] == flow % m


def test_fast_bucket_refuses_a_zero_table():
    from pylb._ffi import ffi, lib

    out = ffi.new("uint32_t[]", 1)
    assert lib.pylb_bucket_burst(ffi.new("uint64_t[]", [5]), 1, 0, out) == lib.PYLB_EINVAL


def test_the_dataplane_buckets_as_the_reference():
    """pylb_dataplane_classify takes the fast path's bucket: it must be the
    reference's, flow id mod table size."""
    from pylb import config as config_mod
    from pylb.dataplane import Dataplane

    cfg = config_mod.parse({
        "balancer": {"name": "t", "data": {"device": "ring:t", "address_v4": "203.0.113.1"}},
        "vips": [{"name": "web", "address": "192.0.2.10", "protocol": "tcp", "port": 80,
                  "table_size": 65521, "backends": [{"name": "a", "address": "203.0.113.10"}]}],
    }, "test")
    dp = Dataplane(cfg, 1)
    try:
        rng = random.Random(5)
        for _ in range(2000):
            key = FlowKey(ipaddress.IPv4Address(rng.getrandbits(32)), "192.0.2.10",
                          rng.getrandbits(16), 80, 6)
            c = dp.classify(key)
            assert c.bucket == bucket(flow_id(key, cfg.balancer.flow_seed), 65521)
    finally:
        dp.close()


# --------------------------------------------------------------- mixing quality

FLOWS, PRIME = 100_000, 1021


def _random_v4(rng: random.Random, count: int):
    return [FlowKey(ipaddress.IPv4Address(rng.getrandbits(32)),
                    ipaddress.IPv4Address(rng.getrandbits(32)),
                    rng.getrandbits(16), rng.getrandbits(16), 6) for _ in range(count)]


VIP = ipaddress.IPv4Address("192.0.2.10")

# Key sets a balancer really sees: structured, differing in few bits.
POPULATIONS = {
    "random v4 5-tuples": lambda count: _random_v4(random.Random(2016), count),
    "one client behind NAT, sequential ports": lambda count: [
        FlowKey(ipaddress.IPv4Address("198.51.100.7"), VIP, 1024 + i % 64000, 80 + i // 64000, 6)
        for i in range(count)],
    "clients of a /15, same port": lambda count: [
        FlowKey(ipaddress.IPv4Address(0x0A000000 + i), VIP, 40000, 443, 6)
        for i in range(count)],
    "v6 clients differing in the interface id": lambda count: [
        FlowKey(ipaddress.IPv6Address((0x20010DB8 << 96) + i * 0x10001),
                ipaddress.IPv6Address("2001:db8::10"), 50000, 443, 17)
        for i in range(count)],
}


@functools.cache
def _population(name: str) -> list[FlowKey]:
    return POPULATIONS[name](FLOWS)


def _chi_square(ids, m: int) -> float:
    counts = [0] * m
    for flow in ids:
        counts[flow % m] += 1
    expected = len(ids) / m
    return sum((c - expected) ** 2 for c in counts) / expected


def _spread_is_plausible(ids, m: int) -> bool:
    """Chi-square within 6 standard deviations of a uniform hash's: too even
    (a hash that just passes sequential ports through) fails as well."""
    dof = m - 1
    return abs(_chi_square(ids, m) - dof) < 6 * (2 * dof) ** 0.5


@pytest.mark.parametrize("population", POPULATIONS)
def test_buckets_are_spread(population):
    ids = [native_flow_id(key, 0x5EED) for key in _population(population)]
    assert _spread_is_plausible(ids, PRIME), f"chi-square {_chi_square(ids, PRIME):.0f}"


def _xor_of_words(key: FlowKey) -> int:
    data = key.to_bytes()
    result = 0
    for start in range(0, 40, 8):
        result ^= int.from_bytes(data[start:start + 8], "little")
    return result


BROKEN_HASHES = {
    "xor of the words, no mixing": _xor_of_words,
    "sum of the key bytes": lambda key: sum(key.to_bytes()),
    "source address only": lambda key: hash_bytes(key.src.packed, 0),
}


@pytest.mark.parametrize("broken", BROKEN_HASHES)
def test_spread_check_rejects_broken_hashes(broken):
    keys = _population("one client behind NAT, sequential ports")
    assert not _spread_is_plausible([BROKEN_HASHES[broken](key) for key in keys], PRIME)


def test_every_input_bit_flips_about_half_the_output_bits():
    rng = random.Random(7)
    key_bits = range(37 * 8)   # all but the 3 pad bytes
    samples = 100
    flips_per_output_bit = [0] * 64
    for bit in key_bits:
        flipped = 0
        for _ in range(samples):
            data = bytearray(rng.getrandbits(8) for _ in range(37)) + bytes(3)
            seed = rng.getrandbits(64)
            before = hash_bytes(bytes(data), seed)
            data[bit // 8] ^= 1 << (bit % 8)
            diff = before ^ hash_bytes(bytes(data), seed)
            flipped += diff.bit_count()
            for out in range(64):
                flips_per_output_bit[out] += (diff >> out) & 1
        assert 29 < flipped / samples < 35, f"input bit {bit}"
    trials = len(key_bits) * samples
    assert all(0.47 < f / trials < 0.53 for f in flips_per_output_bit)


# --------------------------------------------------------------- parsing

@pytest.mark.parametrize("text, expected", [
    ("tcp 198.51.100.7:40000 -> 192.0.2.10:80",
     FlowKey(ipaddress.ip_address("198.51.100.7"), ipaddress.ip_address("192.0.2.10"),
             40000, 80, 6)),
    ("  UDP 198.51.100.7:0->192.0.2.10:65535 ",
     FlowKey(ipaddress.ip_address("198.51.100.7"), ipaddress.ip_address("192.0.2.10"),
             0, 65535, 17)),
    ("tcp [2001:db8::7]:40000 -> [2001:db8::10]:80",
     FlowKey(ipaddress.ip_address("2001:db8::7"), ipaddress.ip_address("2001:db8::10"),
             40000, 80, 6)),
])
def test_parse(text, expected):
    assert FlowKey.parse(text) == expected


@pytest.mark.parametrize("text, message", [
    ("", "is not 'PROTO SRC:PORT -> DST:PORT'"),
    ("tcp 198.51.100.7:40000 192.0.2.10:80", "is not 'PROTO SRC:PORT -> DST:PORT'"),
    ("icmp 198.51.100.7:1 -> 192.0.2.10:2", "unknown protocol 'icmp'"),
    ("tcp 198.51.100.7 -> 192.0.2.10:80", "is not ADDRESS:PORT"),
    ("tcp 2001:db8::7:40000 -> [2001:db8::10]:80", "IPv6 addresses go in brackets"),
    ("tcp ::1:40000 -> [2001:db8::10]:80", "IPv6 addresses go in brackets"),
    ("tcp [198.51.100.7]:1 -> 192.0.2.10:80", "brackets are for IPv6"),
    ("tcp 198.51.100.300:1 -> 192.0.2.10:80", "'198.51.100.300' is not an IP address"),
    ("tcp 198.51.100.7:65536 -> 192.0.2.10:80", "port 65536 is over 65535"),
    ("tcp 198.51.100.7:-1 -> 192.0.2.10:80", "is not ADDRESS:PORT"),
    ("tcp 198.51.100.7:1 -> [2001:db8::10]:80", "not of the same IP version"),
])
def test_parse_errors(text, message):
    with pytest.raises(ValueError, match=message):
        FlowKey.parse(text)


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_seed_out_of_range(seed):
    key = FlowKey.parse("tcp 198.51.100.7:40000 -> 192.0.2.10:80")
    for function in (flow_id, native_flow_id):
        with pytest.raises(ValueError, match="unsigned 64-bit"):
            function(key, seed)


def test_from_bytes_round_trips_and_refuses_a_bad_form():
    for text in ("tcp 198.51.100.7:40000 -> 192.0.2.10:80",
                 "udp [2001:db8::7]:53 -> [2001:db8:1::10]:53"):
        key = FlowKey.parse(text)
        assert FlowKey.from_bytes(key.to_bytes()) == key
        assert FlowKey.from_bytes(bytearray(key.to_bytes())).to_bytes() == key.to_bytes()
    # An IPv6 packet from ::ffff:a.b.c.d to an IPv6 VIP: one mapped address
    # is not an IPv4 flow; the key stays whole and the same bytes.
    mixed = FlowKey(ipaddress.IPv6Address("::ffff:198.51.100.7"),
                    ipaddress.IPv6Address("2001:db8:1::10"), 40000, 80, 6)
    assert FlowKey.from_bytes(mixed.to_bytes()).to_bytes() == mixed.to_bytes()
    with pytest.raises(ValueError):
        FlowKey.from_bytes(mixed.to_bytes()[:39])
    with pytest.raises(ValueError):
        FlowKey.from_bytes(mixed.to_bytes()[:39] + b"\1")

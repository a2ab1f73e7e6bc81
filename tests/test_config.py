"""The configuration schema: good files load, bad ones name the field and the reason."""
from __future__ import annotations

import copy
import pathlib

import pytest

from pylb import config
from pylb.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent

GOOD = {
    "balancer": {"name": "lb1", "data": {"device": "ring:x", "address_v4": "203.0.113.1"}},
    "vips": [{"name": "web", "address": "192.0.2.10", "port": 80,
              "backends": [{"name": "a", "address": "203.0.113.11"},
                           {"name": "b", "address": "203.0.113.12", "weight": 3}]}],
}


def mutate(path: str, value):
    """GOOD with the field at a dotted path (list indices as numbers) set to value;
    value None deletes it."""
    data = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    key = int(last) if last.isdigit() else last
    if value is None:
        del node[key]
    else:
        node[key] = value
    return data


def test_good_config_has_documented_defaults():
    cfg = config.parse(GOOD)
    assert cfg.balancer.workers == 1
    assert cfg.balancer.flow_cache.track == "all"
    assert cfg.vips[0].table_size == 65537
    assert cfg.vips[0].encap.type == "ipip"
    assert cfg.vips[0].backends[0].weight == 1
    assert cfg.balancer.timeouts.as_ms() == [300_000, 10_000, 30_000, 30_000]


@pytest.mark.parametrize("path,value,expect", [
    ("balancer.name", "", "balancer.name"),
    ("balancer.data.device", None, "balancer.data.device"),
    ("balancer.data.address_v4", None, "address_v4 or address_v6 is required"),
    ("balancer.data.address_v4", "300.1.1.1", "balancer.data.address_v4"),
    ("balancer.data.mtu", 100, "balancer.data.mtu"),
    ("balancer.data.neighbors", [{"address": "203.0.113.9", "mac": "zz"}], "is not a MAC address"),
    ("balancer.data.exception", {"policy": "kernel"}, "balancer.data.exception.policy"),
    ("balancer.flow_cache", {"capacity": 1}, "balancer.flow_cache.capacity"),
    ("balancer.timeouts", {"tcp": -1}, "balancer.timeouts.tcp"),
    ("balancer.flow_seed", -5, "balancer.flow_seed"),
    ("balancer.colour", "blue", "balancer.colour: Extra inputs are not permitted"),
    ("vips", [], "vips"),
    ("vips.0.table_size", 65536, "must be a prime"),
    ("vips.0.protocol", "sctp", "vips.0.protocol"),
    ("vips.0.port", 70000, "vips.0.port"),
    ("vips.0.backends", [], "vips.0.backends"),
    ("vips.0.backends.1.name", "a", "backend names repeat: a"),
    ("vips.0.backends.1.address", "203.0.113.11", "backend addresses repeat"),
    ("vips.0.backends.0.weight", -1, "vips.0.backends.0.weight"),
    ("vips.0.backends.0.address", "2001:db8::5", "balancer.data.address_v6 is not set"),
    ("vips.0.encap", {"type": "gre"}, "vips.0.encap.type"),
    ("vips.0.encap", {"type": "vxlan", "vni": 1 << 24}, "vips.0.encap.vni"),
])
def test_bad_field_is_named_with_its_reason(path, value, expect):
    with pytest.raises(ConfigError) as err:
        config.parse(mutate(path, value), "test.yaml")
    assert expect in str(err.value)
    assert str(err.value).startswith("test.yaml")


def test_two_vips_on_the_same_address_protocol_and_port_are_refused():
    data = copy.deepcopy(GOOD)
    data["vips"].append(dict(data["vips"][0], name="web2"))
    with pytest.raises(ConfigError, match="share address, protocol and port"):
        config.parse(data)


def test_all_ports_spelling():
    assert config.parse(mutate("vips.0.port", "all")).vips[0].port is None


@pytest.mark.parametrize("text,expect", [
    ("balancer: [1, 2", "not valid YAML"),
    ("- just\n- a list\n", "top level must be a mapping"),
    ("", "top level must be a mapping"),
])
def test_unreadable_files(tmp_path, text, expect):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=expect):
        config.load(p)


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read"):
        config.load("/nonexistent/pylb.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_examples_are_valid(name):
    config.load(ROOT / "examples" / name)


def _with_cluster(**cluster) -> dict:
    data = copy.deepcopy(GOOD)
    data["cluster"] = {"balancers": [{"name": data["balancer"]["name"],
                                      "address": data["balancer"]["data"]["address_v4"]}],
                       **cluster}
    return data


@pytest.mark.parametrize("cluster, delay", [
    ({}, 175),                  # the default: half of 50 + 100 + 200 ms, under 200
    # At most half of how long the asker tries the owner (30 + 60 + 120 ms), unset.
    ({"request_timeout_ms": 30}, 105),
    ({"request_timeout_ms": 30, "request_retries": 0}, 15),
    ({"request_timeout_ms": 30, "decision_delay_ms": 0}, 0),
    # Valid before the owner asked who carries a flow: the limit only grew.
    ({"request_timeout_ms": 50, "decision_delay_ms": 25}, 25),
])
def test_an_owner_waits_for_state_at_most_half_the_askers_patience(cluster, delay):
    assert config.parse(_with_cluster(**cluster), "test.yaml").cluster.decision_delay() == delay


@pytest.mark.parametrize("timeout, retries, backoff_ms", [
    (50, 2, [50, 100, 200]),
    (10, 6, [10, 20, 40, 80, 160, 160, 160]),      # doubling, at most 16 times
])
def test_the_retry_schedule(timeout, retries, backoff_ms):
    c = config.parse(_with_cluster(request_timeout_ms=timeout, request_retries=retries),
                     "test.yaml").cluster
    assert [c.retry_after_ms(t) for t in range(1, retries + 2)] == backoff_ms
    assert c.owner_patience_ms() == sum(backoff_ms)


def test_a_decision_delay_the_asker_would_not_wait_for_is_refused():
    with pytest.raises(ConfigError) as err:
        config.parse(_with_cluster(request_timeout_ms=30, request_retries=1,
                                   decision_delay_ms=46), "test.yaml")
    assert "decision_delay_ms 46 is more than half of 90 ms" in str(err.value)
    config.parse(_with_cluster(request_timeout_ms=30, request_retries=1, decision_delay_ms=45),
                 "test.yaml")

"""Live reconfiguration under traffic (docs/operations.md): a reload through
the admin API adds, removes and reweights backends while packets flow, and
every established flow keeps its backend from the flow cache; a bad file is
rejected whole and nothing changes; a drained backend takes no new flow while
its established flows go on."""
from __future__ import annotations

import threading

import pytest
from live_support import (BACKEND_NAMES, CLIENT_MAC, ROUTER_MAC, config_dict, deliveries, flows,
                          key_of, live_balancer, write_config)

from pylb.admin import AdminError

pytestmark = pytest.mark.dpdk

BACKENDS = [{"name": name, "address": f"203.0.113.{10 + i}", "weight": 1}
            for i, name in enumerate(BACKEND_NAMES, 1)]
ADDRESS = {b["address"]: b["name"] for b in BACKENDS}


def frames(fl, kind: str) -> list[bytes]:
    return [f.frames(ROUTER_MAC, CLIENT_MAC, [kind])[0] for f in fl]


def test_reload_under_traffic_keeps_every_flow_on_its_backend(eal, tmp_path):
    path = write_config(tmp_path / "lb.yaml", config_dict("ring:reload1", BACKENDS[:3]))
    with live_balancer(path, str(tmp_path / "lb.sock")) as live:
        established = flows(300)
        first = deliveries(live.send(frames(established, "S")))
        assert len(first) == 300
        backend_of = {k: v[0] for k, v in first.items()}

        # Packets of the established flows keep coming while the file changes
        # (a backend added, one reweighted, one removed) and is reloaded.
        changed = [dict(BACKENDS[0], weight=3), BACKENDS[2], BACKENDS[3]]
        write_config(path, config_dict("ring:reload1", changed))
        sent, stop = [], threading.Event()

        def feed():
            while not stop.is_set():
                sent.extend(live.send(frames(established, "PA")))
        feeder = threading.Thread(target=feed)
        feeder.start()
        try:
            answer = live.client.request("POST", "/reload")
        finally:
            stop.set()
            feeder.join(timeout=30)
        sent += live.send(frames(established, "PA"))
        assert answer["changes"] == {"backends_added": ["web/web-4"],
                                     "backends_removed": ["web/web-2"],
                                     "backends_reweighted": ["web/web-1"]}

        after = deliveries(sent)
        assert set(after) == set(backend_of)
        moved = {k: v for k, v in after.items() if set(v) != {backend_of[k]}}
        assert moved == {}, f"{len(moved)} established flows changed backend"
        s = live.stats()
        assert s.fwd_cache_hit >= sum(len(v) for v in after.values())

        # New flows follow the new tables: the added backend gets some, the
        # removed one none.
        fresh = deliveries(live.send(frames(flows(300, seed=99), "S")))
        got = {ADDRESS[v[0]] for v in fresh.values()}
        assert "web-4" in got and "web-2" not in got
        status = live.client.request("GET", "/status")
        assert status["balancer"]["reloads"] == {"ok": 1}
        assert status["active_flows"] >= 600


def test_a_bad_reload_changes_nothing(eal, tmp_path):
    path = write_config(tmp_path / "lb.yaml", config_dict("ring:reload2", BACKENDS[:2]))
    good = path.read_text()
    with live_balancer(path, str(tmp_path / "lb.sock")) as live:
        established = flows(100)
        backend_of = {k: v[0] for k, v in deliveries(live.send(frames(established, "S"))).items()}
        generation = live.client.request("GET", "/status")["balancer"]["generation"]
        one_bad = [dict(BACKENDS[0], weight=2), dict(BACKENDS[1], weight=70000), BACKENDS[2]]
        bad_files = {
            "not YAML": ("balancer: [", "not valid YAML"),
            "schema": (good.replace("weight: 1", "weight: -1"), "backends.0.weight"),
            "restart needed": (good.replace("capacity: 65536", "capacity: 1024"),
                               "balancer.flow_cache: cannot change while running"),
            "a good change beside a bad one": (
                write_config(tmp_path / "x.yaml", config_dict("ring:reload2", one_bad)).read_text(),
                "vips.0.backends.1.weight"),
        }
        for what, (text, reason) in bad_files.items():
            path.write_text(text)
            with pytest.raises(AdminError) as err:
                live.client.request("POST", "/reload")
            assert err.value.status == 422, what
            assert reason in str(err.value) and "rejected whole" in str(err.value), what
        path.write_text(good)
        status = live.client.request("GET", "/status")
        assert status["balancer"]["generation"] == generation
        assert status["balancer"]["reloads"] == {"rejected": len(bad_files)}
        assert [(b["backend"], b["weight"]) for b in status["backends"]] == [("web-1", 1),
                                                                              ("web-2", 1)]
        again = deliveries(live.send(frames(established, "PA")))
        assert {k: v[0] for k, v in again.items()} == backend_of


def test_a_drained_backend_takes_no_new_flow_and_keeps_its_established_ones(eal, tmp_path):
    path = write_config(tmp_path / "lb.yaml", config_dict("ring:reload3", BACKENDS[:3]))
    with live_balancer(path, str(tmp_path / "lb.sock")) as live:
        established = flows(200)
        backend_of = {k: v[0] for k, v in deliveries(live.send(frames(established, "S"))).items()}
        on_web1 = [f for f in established if ADDRESS[backend_of[key_of(f)]] == "web-1"]
        assert on_web1

        answer = live.client.request("POST", "/drain", body={"vip": "web", "backend": "web-1"})
        assert answer["drained"] and answer["tables_changed"]
        rows = {b["backend"]: b for b in live.client.request("GET", "/backends")["backends"]}
        assert rows["web-1"]["effective_weight"] == 0 and rows["web-1"]["buckets"] == 0
        assert rows["web-1"]["weight"] == 1 and rows["web-1"]["drained"]

        kept = deliveries(live.send(frames(on_web1, "PA")))
        assert {ADDRESS[b] for v in kept.values() for b in v} == {"web-1"}
        fresh = deliveries(live.send(frames(flows(200, seed=7), "S")))
        assert "web-1" not in {ADDRESS[v[0]] for v in fresh.values()}

        # A reload keeps the drain; undo brings the backend back.
        live.client.request("POST", "/reload")
        rows = {b["backend"]: b for b in live.client.request("GET", "/backends")["backends"]}
        assert rows["web-1"]["effective_weight"] == 0
        live.client.request("POST", "/drain", body={"vip": "web", "backend": "web-1",
                                                    "undo": True})
        rows = {b["backend"]: b for b in live.client.request("GET", "/backends")["backends"]}
        assert rows["web-1"]["effective_weight"] == 1 and rows["web-1"]["buckets"] > 0

"""The Prometheus endpoint (docs/metrics.md).

Metrics are read from the snapshot the control loop publishes every second
(Balancer.latest_snapshot), never from the worker: a scrape costs the data
path nothing, and a value is at most a second old. Counters of the worker
only grow (they count since start, and backend ids are stable), so they are
exported as Prometheus counters. Active flows are gauges: the flow cache's
own counters, kept as entries are cached and freed.
"""
from __future__ import annotations

from collections import defaultdict

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pylb.stats import DROP_REASONS

# Cluster counters (pylb/cluster.py) under the names the dashboard uses.
OWNER_REQUESTS = {"sent": "requests_sent", "answered": "answers_cached", "timed_out": "retries",
                  "fallback": "fallback"}
STATE_SENT = {"push": "sent_state_push", "handoff": "sent_handoff", "refresh": "sent_refresh",
              "remove": "sent_remove", "clean": "sent_clean"}
CARRIER_QUERIES = {"sent": "carrier_queries_sent", "received": "carrier_queries_received"}
CARRIER_REPLIES = {"state": "carrier_replied_state", "not_here": "carrier_replied_not_here"}
HISTORY_OUTCOMES = {"taken": "history_answers_taken", "none_known": "history_none_known",
                    "unanswered": "history_unanswered"}
CARRIER_DECISIONS = {"state": "carrier_state_adopted", "all_not_here": "carrier_decided_all_not_here",
                     "bound": "carrier_decided_at_bound"}


def _counter(name, doc, labels=(), rows=()):
    m = CounterMetricFamily(name, doc, labels=list(labels))
    for values, value in rows:
        m.add_metric(list(values), value)
    return m


def _gauge(name, doc, labels=(), rows=()):
    m = GaugeMetricFamily(name, doc, labels=list(labels))
    for values, value in rows:
        m.add_metric(list(values), value)
    return m


class SnapshotCollector:
    """A prometheus_client collector over a balancer's latest snapshot."""

    def __init__(self, lb):
        self.lb = lb

    def describe(self):
        # Without this, registering would call collect() before the first snapshot.
        return []

    def collect(self):
        snap = self.lb.latest_snapshot
        if snap is None:
            return
        yield from self._balancer(snap)
        yield from self._traffic(snap)
        if snap.get("cluster"):
            yield from self._cluster(snap["cluster"])

    @staticmethod
    def _balancer(snap):
        b = snap["balancer"]
        yield _gauge("pylb_info", "The balancer (value 1).", ["balancer", "device"],
                     [((b["name"], b["device"]), 1)])
        yield _gauge("pylb_config_generation", "Dataplane generation; grows with every swap.",
                     rows=[((), b["generation"])])
        yield _counter("pylb_config_reloads", "Configuration reloads by result.", ["result"],
                       [((r,), b["reloads"].get(r, 0)) for r in ("ok", "rejected")])
        drain = snap.get("drain")
        yield _gauge("pylb_draining", "1 while the balancer drains (pylb drain).",
                     rows=[((), 1 if drain else 0)])
        yield _gauge("pylb_worker_busy_ratio", "CPU time of the worker's thread over wall time "
                     "since the last snapshot (it sleeps when idle).", ["worker"],
                     [((str(w["id"]),), w["busy_ratio"]) for w in snap["workers"]
                      if w["busy_ratio"] is not None])     # a worker yet to report

    @staticmethod
    def _traffic(snap):
        s = snap["stats"]
        rows = snap["backends"]
        per_vip = defaultdict(lambda: [0, 0, 0])
        for r in rows:
            per_vip[r["vip"]][0] += r["packets"]
            per_vip[r["vip"]][1] += r["bytes"]
            per_vip[r["vip"]][2] += r["new_flows"]
        for v in snap["vips"]:
            per_vip[v["name"]]   # a VIP with no traffic yet still shows, at 0
        yield _counter("pylb_vip_packets", "Packets forwarded per VIP.", ["vip"],
                       [((v,), pb[0]) for v, pb in per_vip.items()])
        yield _counter("pylb_vip_bytes", "Bytes forwarded per VIP (inner packets).", ["vip"],
                       [((v,), pb[1]) for v, pb in per_vip.items()])
        yield _counter("pylb_vip_new_flows", "New flows (TCP SYN, first UDP datagram) "
                       "forwarded by the current table, per VIP.", ["vip"],
                       [((v,), pb[2]) for v, pb in per_vip.items()])
        # Backends a reload removed keep flows until they end: every row counts.
        counted = [r for r in rows if r["active_flows"] is not None]
        active_per_vip = {v["name"]: 0 for v in snap["vips"]}
        for r in counted:
            active_per_vip[r["vip"]] = active_per_vip.get(r["vip"], 0) + r["active_flows"]
        yield _gauge("pylb_vip_active_flows", "Flows in the flow cache now, per VIP.", ["vip"],
                     [((v,), n) for v, n in active_per_vip.items()])
        yield _gauge("pylb_stateful_buckets", "Buckets a backend change in force moved.",
                     ["vip"], [((v["name"],), v["stateful_buckets"]) for v in snap["vips"]])
        key = lambda r: (r["vip"], r["backend"])  # noqa: E731
        yield _counter("pylb_backend_packets", "Packets forwarded per backend.",
                       ["vip", "backend"], [(key(r), r["packets"]) for r in rows])
        yield _counter("pylb_backend_bytes", "Bytes forwarded per backend.", ["vip", "backend"],
                       [(key(r), r["bytes"]) for r in rows])
        yield _counter("pylb_backend_new_flows", "New flows forwarded by the current table, "
                       "per backend.", ["vip", "backend"],
                       [(key(r), r["new_flows"]) for r in rows])
        yield _gauge("pylb_backend_active_flows", "Flows in the flow cache now, per backend.",
                     ["vip", "backend"], [(key(r), r["active_flows"]) for r in counted])
        live = [r for r in rows if r["active"]]
        yield _gauge("pylb_backend_up", "1: passes its health checks (or has none); 0: failing.",
                     ["vip", "backend"], [(key(r), int(r["health"] == "up")) for r in live])
        yield _gauge("pylb_backend_weight", "Configured weight.", ["vip", "backend"],
                     [(key(r), r["weight"]) for r in live])
        yield _gauge("pylb_backend_effective_weight", "Weight in the tables (0 while failing or "
                     "drained).", ["vip", "backend"],
                     [(key(r), r["effective_weight"]) for r in live])
        yield _gauge("pylb_backend_buckets", "Buckets of the current table.", ["vip", "backend"],
                     [(key(r), r["buckets"]) for r in live])
        yield _counter("pylb_received_packets", "Frames received on the data port.",
                       rows=[((), s["rx"])])
        yield _counter("pylb_received_bytes", "Bytes received on the data port.",
                       rows=[((), s["rx_bytes"])])
        yield _counter("pylb_new_flows", "New flows (TCP SYN, first UDP datagram) forwarded by "
                       "the current table.", rows=[((), s["fwd_new"])])
        yield _gauge("pylb_active_flows", "Flows in the flow cache now.",
                     rows=[((), snap["active_flows"])])
        yield _counter("pylb_forwarded_packets", "Packets forwarded, by path.", ["path"],
                       [((p,), s[f"fwd_{p}"]) for p in ("cache_hit", "new", "table", "fragment",
                                                         "verdict")])
        yield _counter("pylb_flow_cache_misses", "Packets of a VIP not in the flow cache, by how "
                       "they were resolved.", ["resolution"],
                       [(("new_flow",), s["fwd_new"]), (("table",), s["fwd_table"]),
                        (("held",), s["held"])])
        yield _counter("pylb_punts", "Packets and notices handed to Python, by reason.", ["reason"],
                       [((k,), v) for k, v in sorted(snap["punts"].items())])
        yield _counter("pylb_drops", "Packets dropped, by reason.", ["reason"],
                       [((r.removeprefix("drop_"),), s[r]) for r in DROP_REASONS])
        yield _counter("pylb_transmitted_packets", "Frames given to the port, by result.",
                       ["result"], [(("ok",), s["tx_ok"]), (("dropped",), s["tx_dropped"])])
        yield _counter("pylb_tap_packets", "Frames the kernel sent through the exception TAP, by "
                       "outcome (health checks via the VIP: steered or not sent).", ["outcome"],
                       [(("to_wire",), s["tap_to_wire"]),
                        (("health_steered",), s["health_steered"]),
                        (("health_steer_failed",), s["health_steer_failed"])])

    @staticmethod
    def _cluster(c):
        n = c["counters"]
        yield _counter("pylb_owner_requests", "State requests this balancer sent to owners, by "
                       "result (timed_out counts each retry).", ["result"],
                       [((k,), n.get(v, 0)) for k, v in OWNER_REQUESTS.items()])
        yield _counter("pylb_owner_requests_served", "State requests this balancer answered as "
                       "owner.", rows=[((), n.get("requests_answered", 0))])
        yield _counter("pylb_state_messages_sent", "Peer messages carrying state, by kind.",
                       ["kind"], [((k,), n.get(v, 0)) for k, v in STATE_SENT.items()])
        yield _counter("pylb_handoff_records", "Flow-state records handed to new holders when "
                       "ownership moved.", rows=[((), n.get("handoff_records", 0))])
        yield _counter("pylb_state_passed_on", "Pushed flow-state records passed on to the "
                       "holders of this balancer's view (the sender had another member set).",
                       rows=[((), n.get("pushes_passed_on", 0))])
        yield _counter("pylb_state_pushed_after_change", "Flows of moved buckets whose state this "
                       "balancer pushed to their owners after a backend change.",
                       rows=[((), n.get("pushed_after_change", 0))])
        yield _counter("pylb_buckets_retired", "Stateful buckets this balancer retired.",
                       rows=[((), n.get("buckets_retired", 0))])
        yield _counter("pylb_carrier_queries", "Questions who carries a flow, one per flow and "
                       "balancer: sent as an owner without its state, received.", ["direction"],
                       [((k,), n.get(v, 0)) for k, v in CARRIER_QUERIES.items()])
        yield _counter("pylb_carrier_replies", "Replies this balancer sent to carrier queries, by "
                       "answer.", ["answer"],
                       [((k,), n.get(v, 0)) for k, v in CARRIER_REPLIES.items()])
        yield _counter("pylb_carrier_decisions", "Flows this balancer decided after asking who "
                       "carries them: by a reply's state, by rule 4 once all said not here, by "
                       "rule 4 at the bound.", ["how"],
                       [((k,), n.get(v, 0)) for k, v in CARRIER_DECISIONS.items()])
        yield _counter("pylb_history_learnt", "How a starting balancer learnt the tables in force "
                       "from the members: answers taken, nobody knew any (the cluster starts), "
                       "nobody answered within the bound.", ["outcome"],
                       [((k,), n.get(v, 0)) for k, v in HISTORY_OUTCOMES.items()])
        yield _counter("pylb_peer_messages", "Peer messages received, by result.", ["result"],
                       [((k,), v) for k, v in sorted(c["peer"].items())])
        yield _gauge("pylb_state_entries", "Flow-state records held as owner or backup.",
                     rows=[((), c["state_entries"])])
        yield _gauge("pylb_cluster_members", "Balancers in the configured cluster.",
                     rows=[((), len(c["members"]))])


class MetricsServer:
    """Serves /metrics on (host, port) in a thread until close()."""

    def __init__(self, lb, address: tuple[str, int]):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(lb))
        self._httpd, self._thread = start_http_server(address[1], address[0],
                                                      registry=self.registry)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

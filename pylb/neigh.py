"""The next-hop table of a worker process: static overrides plus what ARP/NDP teach."""
from __future__ import annotations

from pylb._ffi import check, ffi, ip_to_c, lib


class NeighborTable:
    def __init__(self, capacity: int = 4096):
        out = ffi.new("struct pylb_neigh **")
        check(lib.pylb_neigh_create(capacity, out), "neighbour table")
        self._n = out[0]

    @property
    def handle(self):
        if self._n is None:
            raise ValueError("neighbour table is closed")
        return self._n

    def set_static(self, address, mac: str) -> None:
        ip = ffi.new("struct pylb_ip *")
        ip_to_c(address, ip)
        check(lib.pylb_neigh_set_static(self.handle, ip, bytes(int(x, 16) for x in mac.split(":"))),
              f"static neighbour {address}")

    def learn(self, address, mac: str) -> None:
        """A MAC as if the wire had taught it (what lane 0 learnt, for the
        balancer's other worker processes); static entries keep theirs."""
        ip = ffi.new("struct pylb_ip *")
        ip_to_c(address, ip)
        check(lib.pylb_neigh_learn(self.handle, ip, bytes(int(x, 16) for x in mac.split(":"))),
              f"neighbour {address}")

    def lookup(self, address) -> str | None:
        ip = ffi.new("struct pylb_ip *")
        ip_to_c(address, ip)
        mac = ffi.new("uint8_t[6]")
        if lib.pylb_neigh_lookup(self.handle, ip, mac):
            return ":".join(f"{b:02x}" for b in mac)
        return None

    def close(self) -> None:
        if self._n is not None:
            lib.pylb_neigh_destroy(self._n)
            self._n = None

    def __enter__(self) -> "NeighborTable":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

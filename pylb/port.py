"""A DPDK port: a vdev string, a PCI address, or "ring:NAME" for tests."""
from __future__ import annotations

from dataclasses import dataclass

from pylb._ffi import check, ffi, lib


@dataclass(frozen=True)
class PortStats:
    ipackets: int
    opackets: int
    ibytes: int
    obytes: int
    imissed: int
    ierrors: int
    oerrors: int
    rx_nombuf: int


class Port:
    def __init__(self, device: str, *, rx_queues: int = 1, tx_queues: int = 1, rx_desc: int = 1024,
                 tx_desc: int = 1024, mbufs: int = 16383, mtu: int = 0, promiscuous: bool = True):
        self.device = device
        conf = ffi.new("struct pylb_port_conf *")
        dev = ffi.new("char[]", device.encode())
        conf.device = dev
        conf.rx_queues, conf.tx_queues = rx_queues, tx_queues
        conf.rx_desc, conf.tx_desc = rx_desc, tx_desc
        conf.mbufs, conf.mtu, conf.promiscuous = mbufs, mtu, int(promiscuous)
        out = ffi.new("struct pylb_port **")
        check(lib.pylb_port_open(conf, out), f"opening port {device}")
        self._p = out[0]

    @classmethod
    def attach(cls, device: str) -> "Port":
        """In a DPDK secondary process (another worker of the balancer): the
        port the primary opened from `device`. close() leaves it to the primary."""
        self = cls.__new__(cls)
        self.device = device
        out = ffi.new("struct pylb_port **")
        check(lib.pylb_port_attach(device.encode(), out), f"attaching port {device}")
        self._p = out[0]
        return self

    @property
    def handle(self):
        """The C handle, for other pylb modules only."""
        if self._p is None:
            raise ValueError(f"port {self.device} is closed")
        return self._p

    @property
    def mac(self) -> str:
        mac = ffi.new("uint8_t[6]")
        check(lib.pylb_port_mac(self.handle, mac), "port MAC")
        return ":".join(f"{b:02x}" for b in mac)

    def info(self) -> dict:
        """Driver name, the largest MTU it reports, queue limits."""
        i = ffi.new("struct pylb_port_info *")
        check(lib.pylb_port_info(self.handle, i), "port info")
        return {"driver": ffi.string(i.driver).decode(), "max_mtu": i.max_mtu,
                "rx_queues_max": i.rx_queues_max, "tx_queues_max": i.tx_queues_max}

    def stats(self) -> PortStats:
        s = ffi.new("struct pylb_port_stats *")
        check(lib.pylb_port_stats(self.handle, s), "port stats")
        return PortStats(**{f: getattr(s, f) for f in PortStats.__dataclass_fields__})

    def inject(self, frames: list[bytes]) -> int:
        """ring: ports: frames appear on the port's RX side. Returns how many fit."""
        if not frames:
            return 0
        keep = [ffi.from_buffer(f) for f in frames]
        ptrs = ffi.new("uint8_t *[]", keep)
        lens = ffi.new("uint32_t[]", [len(f) for f in frames])
        done = ffi.new("uint32_t *")
        check(lib.pylb_port_inject(self.handle, ptrs, lens, len(frames), done), "inject")
        return done[0]

    def drain(self, max_frames: int = 4096, stride: int = 2048) -> list[bytes]:
        """ring: ports: what the port transmitted."""
        buf = ffi.new("uint8_t[]", max_frames * stride)
        lens = ffi.new("uint32_t[]", max_frames)
        n = ffi.new("uint32_t *")
        cut = ffi.new("uint32_t *")
        check(lib.pylb_port_drain(self.handle, buf, stride, lens, max_frames, n, cut), "drain")
        raw = ffi.buffer(buf)
        return [bytes(raw[i * stride:i * stride + lens[i]]) for i in range(n[0])]

    def close(self) -> None:
        if self._p is not None:
            lib.pylb_port_close(self._p)
            self._p = None

    def __enter__(self) -> "Port":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

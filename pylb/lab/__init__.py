"""The lab: a whole pylb cluster on one machine, in network namespaces.

Clients with the kernel's TCP, a router spreading the VIPs over the balancers
by ECMP, `pylb run` balancers on af_packet, and backends whose kernels
decapsulate VXLAN and answer the clients directly (DSR). `pylb lab demo`
runs the churn demo on it with state exchange on and off (docs/lab.md).

- topology.py: the namespaces, addresses, router, backends and balancers
- backend.py:  the service each backend runs (HTTP and a greeting echo)
- traffic.py:  the client program (echo streams checked byte by byte, HTTP)
- churn.py:    the workload and the churn steps, one run per mode
- report.py:   live progress, the per-step table and the summary
"""

"""pylb: an L4 load balancer with a DPDK data plane and flow ownership across balancers."""

__version__ = "0.1.0"

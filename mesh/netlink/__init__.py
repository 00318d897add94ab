"""Our own netlink: what Shoal sends to the kernel without a library, where speed needs it.

- `attrs.py`: attributes (struct nlattr), encoding and decoding;
- `core.py`: the socket, message framing, pipelined requests, acknowledgements, dumps;
- `nfnetlink.py`: the netfilter protocol, for nf_tables (mesh/nft/, atomic batches) and
  ctnetlink (mesh/conntrack.py);
- `rtnl.py`: static neighbour and FDB entries, in batches (mesh/overlay.py);
- `links.py`: links, addresses and default routes, in batches: task endpoints (veth pairs)
  plugged in by the thousand (mesh/overlay.py).

The rest goes through pyroute2: bridges and VXLAN devices (mesh/overlay.py), IPVS
(mesh/lb/ipvs.py), and the generic netlink family lookup (mesh/lb/select.py). Where we do it
ourselves and why is in docs/architecture.md (the data plane).
"""

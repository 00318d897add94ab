"""The swarm's PKI: who a node is, how it proves it, and how that is renewed and rotated.

A library for shoald (see docs/security.md for the design and the flows):

- `pki`: the root CA (made at `swarm init`), node keys and CSRs, issuing node certificates
  (`CN=<node ID>, OU=swarm-manager|swarm-worker, O=<cluster ID>`), identities, chain
  verification, root rotation by cross-signing.
- `tokens`: join tokens `SWMTKN-1-<root digest>-<secret>` (CA pinning, constant-time role
  check) and unlock keys `SWMKEY-1-...`.
- `renewal`: when a node renews (a random point in 50-80% of the lifetime, or at once after
  a role change or during a root rotation).
- `tls`: gRPC credentials for the two listeners (mutual TLS on the control port, plain
  server TLS on the join port), swappable without restarts; the join bootstrap; the caller's
  identity from its certificate.
- `authz`: which role may call which RPC, the deny list of removed nodes, and the grpc.aio
  interceptor that enforces both.
- `files`: a node's key and certificates on disk, saved so a crash cannot tear them.
"""

"""The control plane's RPC layer (gRPC)."""

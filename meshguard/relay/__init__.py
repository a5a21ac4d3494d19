"""The TLS relay: members move WireGuard datagrams over a TLS connection when UDP cannot.

Sans-I/O parts: :mod:`.frames` (framing), :mod:`.auth` (member proof), :mod:`.paths` (the "via
TLS relay" path). Twisted adapters: :mod:`.server`, :mod:`.client`, :mod:`.service`.
See docs/relay.md.
"""

"""The TLS relay's sans-I/O half: members move WireGuard datagrams over TLS when UDP cannot.

:mod:`.frames` (framing), :mod:`.auth` (member proof), :mod:`.fairness` (sharing a receiver),
:mod:`.paths` (the "via TLS relay" path). The Twisted half (client, server, the connection both
share, the node's service) is :mod:`meshguard.adapters.relay`. See docs/relay.md.
"""

"""Port mapping: asking the home gateway to forward a public port to our WireGuard socket.

``natpmp`` and ``pcp`` are sans-I/O codecs (bytes in, values out); ``exchange`` is the Twisted
datagram protocol that carries one request to the gateway; ``upnp`` wraps the miniupnpc binding in
a thread; ``client`` is the state machine that tries PCP, then NAT-PMP, then UPnP-IGD, renews
before expiry and removes the mapping on stop. docs/portmapping.md says how to use it.
"""

"""Port mapping's sans-I/O codecs: asking the home gateway to forward a public port to us.

``natpmp`` and ``pcp`` encode requests and parse answers (bytes in, values out). The Twisted half
is :mod:`meshguard.adapters.portmap`: ``exchange`` carries one request to the gateway, ``upnp``
wraps the miniupnpc binding in a thread, ``client`` is the state machine that tries PCP, then
NAT-PMP, then UPnP-IGD, renews before expiry and removes the mapping on stop. docs/portmapping.md
says how to use it.
"""

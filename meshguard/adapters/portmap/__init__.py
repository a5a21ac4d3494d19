"""Port mapping's Twisted side: the client state machine, the three methods (PCP, NAT-PMP,
UPnP-IGD), the request exchange, announcements and the node's service. The sans-I/O
codecs are :mod:`meshguard.portmap`. docs/portmapping.md says how to use it.
"""

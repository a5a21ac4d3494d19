"""The OS and network adapters: the only place where Twisted meets the OS.

TUN and UDP, probe and birthday sockets, the link and routes, the UAPI, status and DNS
servers, the stores, metrics, the TLS relay's connections and port mapping, and how OpenSSL
is loaded. Adapters import the cores and the codecs, never the composition
(:mod:`meshguard.app`). See docs/architecture.md.
"""

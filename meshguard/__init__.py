"""meshguard: a mesh VPN node on Twisted that speaks the WireGuard protocol."""

__version__ = "0.1.0"

"""The ``twistd meshguard`` plugin (Twisted finds it here; this directory has no __init__.py)."""

from twisted.application.service import ServiceMaker

meshguard = ServiceMaker(
    "meshguard",
    "meshguard.app.tap",
    "A mesh VPN node that speaks the WireGuard protocol.",
    "meshguard",
)

"""meshguard tests (run with Twisted Trial)."""

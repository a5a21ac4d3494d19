"""Formats without I/O: the config file, the WireGuard UAPI text, key encodings."""

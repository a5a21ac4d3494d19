"""``twistd meshguard``: command-line options and the service they make."""

from __future__ import annotations

import os

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from meshguard.adapters.hot_reactor import install_if_free
from meshguard.app.service import NodeService, StartupError
from meshguard.codecs.config import ConfigError, load_config

log = Logger()


class Options(usage.Options):
    """``twistd [-n] meshguard --config PATH [--interface NAME]``."""

    optParameters = [
        ["config", "c", None, "Config file (wg-quick format, meshguard superset)."],
        ["interface", "i", None, "Interface name (default: the config file's stem)."],
        ["uapi-dir", None, "/var/run/wireguard", "Directory of the UAPI sockets (wg's)."],
        ["status-dir", None, "/var/run/meshguard", "Directory of the status sockets."],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config PATH is required")
        if not self["interface"]:
            self["interface"] = os.path.splitext(os.path.basename(self["config"]))[0]
        if not 0 < len(self["interface"].encode()) <= 15 or "/" in self["interface"]:
            raise usage.UsageError(
                f"interface name {self['interface']!r} must be 1 to 15 characters without '/'"
            )


def makeService(options: Options) -> IService:
    """Read the config now, so a bad file ends twistd with one line before anything is set up.

    Then put the data path's reactor in place (``meshguard.adapters.hot_reactor``): twistd
    calls this before anything imports the global reactor, unless ``--reactor`` chose one
    (that choice stands, as does trial's in tests).
    """
    try:
        config = load_config(options["config"])
    except ConfigError as e:
        raise StartupError(str(e)) from e
    for warning in config.warnings:  # e.g. a key file others may read: say so, run anyway
        log.warn("{warning}", warning=warning)
    install_if_free()
    parent = getattr(options, "parent", None)  # twistd's own options, when run by twistd
    return NodeService(
        options["interface"],
        config,
        config_path=options["config"],
        uapi_directory=options["uapi-dir"],
        status_directory=options["status-dir"],
        daemon=parent is not None and not parent.get("nodaemon", True),
    )

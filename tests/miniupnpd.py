"""Debian's miniupnpd (UPnP-IGD, NAT-PMP and PCP) as the port-mapping server of a test router.

For the routers of :func:`tests.netns.nat_homes` (LAN bridge ``br0``, uplink ``wan0``). Their
public addresses (203.0.N.2) are outside the ranges miniupnpd 2.3 treats as reserved, so it
enables forwarding without the STUN check that ../shared/netns/miniupnpd-recipe.sh needs for
198.51.100.0/24. miniupnpd adds its DNAT and forward rules to chains we create (Debian's
``nft_*.sh`` helpers do not work in a namespace), and leaves them behind on SIGTERM, which does
not matter: the router namespace goes with the test.
"""

from __future__ import annotations

import subprocess

from tests.netns import Namespace, Testbed

MINIUPNPD = "/usr/sbin/miniupnpd"

RULESET = """\
table inet mupnp_filter {
  chain forward {
    type filter hook forward priority 0; policy accept;
    jump miniupnpd
  }
  chain miniupnpd {
  }
}
table inet mupnp_nat {
  chain prerouting {
    type nat hook prerouting priority -100; policy accept;
    jump prerouting_miniupnpd
  }
  chain postrouting {
    type nat hook postrouting priority 90; policy accept;
    jump postrouting_miniupnpd
  }
  chain prerouting_miniupnpd {
  }
  chain postrouting_miniupnpd {
  }
}
"""


def start_miniupnpd(
    testbed: Testbed,
    router: Namespace,
    lan_network: str,
    *,
    lan_dev: str = "br0",
    wan_dev: str = "wan0",
    timeout: float = 20.0,
) -> subprocess.Popen[bytes]:
    """Run miniupnpd in ``router`` serving ``lan_network``; returns once NAT-PMP/PCP and
    UPnP listen."""
    testbed.nft(router, RULESET)
    name = router.name.rsplit("-", 1)[-1]
    config = testbed.log_dir / f"miniupnpd-{name}.conf"
    config.write_text(
        "\n".join(
            [
                f"ext_ifname={wan_dev}",
                f"listening_ip={lan_dev}",
                "http_port=5000",
                "enable_upnp=yes",
                "enable_natpmp=yes",
                "upnp_table_name=mupnp_filter",
                "upnp_nat_table_name=mupnp_nat",
                "upnp_forward_chain=miniupnpd",
                "upnp_nat_chain=prerouting_miniupnpd",
                "upnp_nat_postrouting_chain=postrouting_miniupnpd",
                "secure_mode=yes",
                "system_uptime=yes",
                "notify_interval=60",
                "clean_ruleset_interval=600",
                f"lease_file={testbed.log_dir / f'upnp-{name}.leases'}",
                "uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b",
                f"allow 1024-65535 {lan_network} 1024-65535",
                "deny 0-65535 0.0.0.0/0 0-65535",
            ]
        )
        + "\n"
    )
    # Its own pid file: miniupnpd unlinks the file on exit (never point it at /dev/null).
    pidfile = testbed.log_dir / f"miniupnpd-{name}.pid"
    proc = testbed.spawn(router, [MINIUPNPD, "-d", "-f", str(config), "-P", str(pidfile)])

    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"miniupnpd exited: {testbed.log_tail(proc)}")
        return "Listening for NAT-PMP/PCP traffic" in testbed.log_tail(proc, 100000)

    testbed.wait_for(listening, timeout, what="miniupnpd to listen")
    return proc

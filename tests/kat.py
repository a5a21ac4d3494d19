"""The digest's worked handshake (shared/research/wireguard-protocol.md, section 2), shared by the
message, Noise and cookie tests (not a test module)."""

from __future__ import annotations

#: Initiation and response with mac1 filled and mac2 zero.
KAT_INITIATION = bytes.fromhex(
    "0100000044332211519397ccd3ec065961cf837d7deb1dfeb23e604e5a0baff3ed98283ec8609404"
    "77de410efb379d5b4ae2849c8766b5bb79a3897d279ce079d215fcc872d0702e621170cc4be007eb"
    "20a8906916528f5c5e9912eb52298304c21ca47d0a53554a90d6b93c2ad8b9622869da1c629cda64"
    "7ae6f469a600bb984fa71e3900000000000000000000000000000000"
)
KAT_RESPONSE = bytes.fromhex(
    "02000000887766554433221105124a6098f0aa5239606ab01def19678dbbf1691924165ea50bb3cc"
    "67c6657cdbf1ba13a1dfb832566d24869f2f735a955674b300f8656fc0cb806d7e98d70500000000"
    "000000000000000000000000"
)
KAT_COOKIE_REPLY = bytes.fromhex(
    "030000004433221129e3504b308092e730c1fe478a7d72e803f398983dd83701"
    "dbb5c76d214fb84d7d111cfffa6a6bda5836da95a957f3f32ea07b2d75044d5e"
)

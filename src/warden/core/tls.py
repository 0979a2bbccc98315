"""The TLS settings every Warden listener uses (the hub's HTTPS listener, the broker's MQTT listener)."""

from __future__ import annotations

__all__ = ["COMMAND_SIGNING_EKU_OID", "TLS12_CIPHERS", "TLS13_CIPHERSUITES"]

#: TLS 1.2: forward secrecy and AEAD only (OpenSSL cipher string)
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
#: TLS 1.3: the three suites every implementation has (OpenSSL ciphersuites string)
TLS13_CIPHERSUITES = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"
#: the extended key usage of the hub's command-signing certificate: an OID under the UUID arc 2.25 (ITU-T X.667),
#: which anyone may use without registering a number
COMMAND_SIGNING_EKU_OID = "2.25.171028746524411813327925338327593961265"

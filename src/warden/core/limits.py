"""Size limits for every input Warden parses, in one place (python-tuf keeps them in one config dataclass too)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_LIMITS", "Limits"]


@dataclass(frozen=True, slots=True)
class Limits:
    #: a PKCS#10 request, PEM or DER
    max_csr_bytes: int = 16 * 1024
    #: an OCSP request (RFC 6960 requests for one certificate are about 100 bytes)
    max_ocsp_request_bytes: int = 8 * 1024
    #: a settings file
    max_settings_bytes: int = 64 * 1024
    #: free text on a state change or revocation
    max_reason_chars: int = 512
    #: a device display name
    max_display_name_chars: int = 128
    #: tags on one device
    max_tags_per_device: int = 64
    #: groups one device belongs to
    max_groups_per_device: int = 32
    #: a certificate or key file read from disk (PEM)
    max_pem_file_bytes: int = 256 * 1024
    #: how many audit records one `audit list` returns at most
    max_audit_list: int = 100_000
    #: an HTTP request body of the operator API (EST and OCSP routes set far smaller ones)
    max_request_body_bytes: int = 4 * 1024 * 1024
    #: a PEM bundle of trusted manufacturer CAs for one enrollment group
    max_ca_bundle_certs: int = 16
    #: a CSV import
    max_csv_bytes: int = 32 * 1024 * 1024
    max_csv_rows: int = 200_000
    #: entries of one enrollment group's allow or deny list
    max_id_list_entries: int = 100_000
    #: one page of an API listing
    max_page_size: int = 1000
    #: the RSA modulus sizes Warden accepts in a CSR
    min_rsa_bits: int = 2048
    max_rsa_bits: int = 8192


DEFAULT_LIMITS = Limits()

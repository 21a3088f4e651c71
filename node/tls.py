"""SSL contexts for DICOM TLS (the secure transport connection profile, TLS 1.2 or later).

Listener: our certificate; client certificates verified against
`tls.ca_certificates` (required when `tls.require_client_certificate`).
Sending: the peer's certificate is verified against `tls.ca_certificates` alone
(never the system trust store: a hospital's DICOM peers carry certificates of
its own CA, and a public CA must not vouch for a PACS) and must name the host we
connect to (`check_hostname`, IP addresses matched against IP SANs). The
settings refuse outgoing TLS without a CA bundle.
"""
from __future__ import annotations

import ssl

from config.settings import TLSSettings


def server_context(tls: TLSSettings) -> ssl.SSLContext:
    """The listener's context: our certificate; client certificates verified, and required when configured."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.certificate is None or tls.private_key is None:  # TLSSettings refuses this when TLS is enabled
        raise ValueError("tls.certificate and tls.private_key are required for a TLS listener")
    context.load_cert_chain(tls.certificate, tls.private_key)
    if tls.ca_certificates is not None:
        context.load_verify_locations(cafile=tls.ca_certificates)
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return context


def client_context(tls: TLSSettings) -> ssl.SSLContext:
    """The context for sending to a TLS peer: its certificate verified against our CA bundle and its host name
    checked; ours presented if set. ValueError without `tls.ca_certificates`."""
    if tls.ca_certificates is None:
        raise ValueError("tls.ca_certificates is required to send over DICOM TLS")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cafile=tls.ca_certificates)
    if tls.certificate is not None and tls.private_key is not None:
        context.load_cert_chain(tls.certificate, tls.private_key)
    return context


def tls_args(context: ssl.SSLContext | None, host: str) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's `tls_args` for connecting to `host`: the host name the peer's certificate must carry."""
    return None if context is None else (context, host)

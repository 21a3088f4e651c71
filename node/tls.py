"""SSL contexts for DICOM TLS (the secure transport connection profile, TLS 1.2 or later).

Certificates are verified against `tls.ca_certificates`; host names are not
checked, as DICOM peers are identified by certificate and AE title.
"""
from __future__ import annotations

import ssl

from config.settings import TLSSettings


def server_context(tls: TLSSettings) -> ssl.SSLContext:
    """The listener's context: our certificate; client certificates verified, and required when configured."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.certificate, tls.private_key)
    if tls.ca_certificates is not None:
        context.load_verify_locations(cafile=tls.ca_certificates)
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return context


def client_context(tls: TLSSettings) -> ssl.SSLContext:
    """The context for sending to a TLS destination: the peer's certificate verified, ours presented if set."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    if tls.ca_certificates is not None:
        context.load_verify_locations(cafile=tls.ca_certificates)
    else:
        context.load_default_certs()
    if tls.certificate is not None and tls.private_key is not None:
        context.load_cert_chain(tls.certificate, tls.private_key)
    return context

"""Kafka security settings (TLS and SASL) translated for Faust and for plain aiokafka clients.

Both translations read the same settings, so the Faust app and the project's own admin,
consumer and producer clients always connect the same way.
"""

from __future__ import annotations

import ssl
from typing import Any

import faust
from faust.types.auth import CredentialsT

from handlers.errors import ConfigError

from .settings import ENV_PREFIX, Settings

TLS_PROTOCOLS = frozenset({"SSL", "SASL_SSL"})
SASL_PROTOCOLS = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})


def kafka_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """Build the TLS context of the SSL and SASL_SSL protocols; None for the others.

    The context verifies the broker's certificate and host name against
    PROFILESTREAM_KAFKA_SSL_CAFILE, or the system's CA certificates when it is unset, and
    presents the client certificate when one is set. Raises ConfigError when a file is not
    valid PEM or the private key is encrypted.
    """
    if settings.kafka_security_protocol not in TLS_PROTOCOLS:
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.kafka_ssl_cafile)
        if settings.kafka_ssl_certfile is not None:
            # An empty password makes an encrypted key fail here, where OpenSSL would
            # otherwise prompt on the terminal and block the worker.
            context.load_cert_chain(settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile, password=lambda: b"")
        return context
    except OSError as error:  # ssl.SSLError included
        raise ConfigError(
            f"cannot load the Kafka TLS files ({_describe_files(settings)}): {error}; check that"
            f" {ENV_PREFIX}KAFKA_SSL_CAFILE, {ENV_PREFIX}KAFKA_SSL_CERTFILE and {ENV_PREFIX}KAFKA_SSL_KEYFILE"
            " are PEM files and that the key is not encrypted"
        ) from None


def faust_broker_credentials(settings: Settings) -> CredentialsT | None:
    """Return the `broker_credentials` of the Faust app: SSL or SASL credentials, or None for PLAINTEXT."""
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    context = kafka_ssl_context(settings)
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    # SASLCredentials switches its protocol to SASL_SSL when it gets a TLS context.
    return faust.SASLCredentials(
        username=settings.kafka_sasl_username,
        password=_sasl_password(settings),
        ssl_context=context,
        mechanism=settings.kafka_sasl_mechanism,
    )


def aiokafka_security_kwargs(settings: Settings) -> dict[str, Any]:
    """Return the security arguments of an aiokafka producer, consumer or admin client."""
    protocol = settings.kafka_security_protocol
    kwargs: dict[str, Any] = {"security_protocol": protocol}
    if protocol in TLS_PROTOCOLS:
        kwargs["ssl_context"] = kafka_ssl_context(settings)
    if protocol in SASL_PROTOCOLS:
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kwargs["sasl_plain_username"] = settings.kafka_sasl_username
        kwargs["sasl_plain_password"] = _sasl_password(settings)
    return kwargs


def _sasl_password(settings: Settings) -> str | None:
    password = settings.kafka_sasl_password
    return None if password is None else password.get_secret_value()


def _describe_files(settings: Settings) -> str:
    files = {
        "cafile": settings.kafka_ssl_cafile,
        "certfile": settings.kafka_ssl_certfile,
        "keyfile": settings.kafka_ssl_keyfile,
    }
    return ", ".join(f"{name}={path}" for name, path in files.items() if path is not None) or "system CA certificates"

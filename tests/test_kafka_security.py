"""Kafka TLS and SASL settings: validation, the Faust and aiokafka translations, and a real SASL/PLAIN listener."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import faust
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from handlers.errors import ConfigError
from stream.importers import jsonl, stackexchange
from stream.kafka_security import aiokafka_security_kwargs, faust_broker_credentials, kafka_ssl_context
from stream.logs import secrets_of
from stream.progress import wait_until_caught_up
from stream.replay import replay
from stream.services.kafka import KafkaBroker
from stream.services.ports import LOOPBACK, free_port
from stream.settings import load_settings
from stream.worker import prepare
from tests.tls_files import Certificate, encrypt_key, make_ca, make_certificate
from tests.worker_harness import WorkerProcess, isolated_settings

FIXTURE = Path(__file__).parent / "fixtures" / "stackexchange"
SASL_USER = "alice"
SASL_PASSWORD = "alice-test-password"
SASL = {"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_username": SASL_USER, "kafka_sasl_password": SASL_PASSWORD}
CATCH_UP_TIMEOUT_S = 180
CLIENT_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> dict[str, Certificate | Path]:
    folder = tmp_path_factory.mktemp("kafka-tls")
    ca = make_ca(folder)
    client = make_certificate(folder, ca, "client", "DNS:client.invalid")
    return {"ca": ca, "client": client, "encrypted_key": encrypt_key(client.keyfile, "key-passphrase")}


def config_error(**values) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(**values)
    return str(caught.value)


# Validation


def test_sasl_without_credentials_names_both():
    message = config_error(kafka_security_protocol="SASL_PLAINTEXT")
    assert "PROFILESTREAM_KAFKA_SASL_USERNAME" in message
    assert "PROFILESTREAM_KAFKA_SASL_PASSWORD" in message


def test_sasl_without_password_names_it():
    message = config_error(kafka_security_protocol="SASL_SSL", kafka_sasl_username=SASL_USER)
    assert message.endswith("set PROFILESTREAM_KAFKA_SASL_PASSWORD")


def test_sasl_empty_username_rejected():
    message = config_error(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="", kafka_sasl_password="x")
    assert message.endswith("set PROFILESTREAM_KAFKA_SASL_USERNAME")


def test_credentials_without_sasl_protocol():
    message = config_error(kafka_sasl_username=SASL_USER, kafka_sasl_password=SASL_PASSWORD)
    assert "PROFILESTREAM_KAFKA_SECURITY_PROTOCOL=PLAINTEXT" in message
    assert "SASL_PLAINTEXT or SASL_SSL" in message


def test_error_hides_sasl_password():
    message = config_error(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username=SASL_USER,
                           kafka_sasl_password=SASL_PASSWORD, kafka_ssl_keyfile=__file__)
    assert SASL_PASSWORD not in message


def test_tls_files_without_tls_protocol(tls):
    message = config_error(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username=SASL_USER,
                           kafka_sasl_password=SASL_PASSWORD, kafka_ssl_cafile=str(tls["ca"].certfile))
    assert "PROFILESTREAM_KAFKA_SSL_CAFILE is set" in message
    assert "SSL or SASL_SSL" in message


def test_keyfile_without_certfile(tls):
    message = config_error(kafka_security_protocol="SSL", kafka_ssl_keyfile=str(tls["client"].keyfile))
    assert "PROFILESTREAM_KAFKA_SSL_CERTFILE is not" in message


@pytest.mark.parametrize("name", ["kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile"])
def test_missing_tls_file_names_variable(tmp_path, name):
    missing = tmp_path / "absent.pem"
    message = config_error(kafka_security_protocol="SSL", **{name: str(missing)})
    assert f"PROFILESTREAM_{name.upper()}" in message
    assert str(missing) in message


def test_unknown_mechanism_rejected():
    message = config_error(**SASL, kafka_sasl_mechanism="GSSAPI")
    assert "PROFILESTREAM_KAFKA_SASL_MECHANISM" in message


def test_log_redacts_sasl_password():
    assert SASL_PASSWORD in secrets_of(load_settings(**SASL))


# Translation


def test_plaintext_translation():
    settings = load_settings()
    assert faust_broker_credentials(settings) is None
    assert aiokafka_security_kwargs(settings) == {"security_protocol": "PLAINTEXT"}
    assert kafka_ssl_context(settings) is None


def test_sasl_plaintext_translation():
    settings = load_settings(**SASL, kafka_sasl_mechanism="SCRAM-SHA-256")
    credentials = faust_broker_credentials(settings)
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.protocol.value == "SASL_PLAINTEXT"
    assert credentials.mechanism.value == "SCRAM-SHA-256"
    assert credentials.username == SASL_USER
    assert credentials.password == SASL_PASSWORD
    assert credentials.ssl_context is None
    assert aiokafka_security_kwargs(settings) == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": SASL_USER,
        "sasl_plain_password": SASL_PASSWORD,
    }


def test_sasl_ssl_translation(tls):
    settings = load_settings(**{**SASL, "kafka_security_protocol": "SASL_SSL"}, kafka_sasl_mechanism="SCRAM-SHA-512",
                             kafka_ssl_cafile=str(tls["ca"].certfile))
    credentials = faust_broker_credentials(settings)
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.protocol.value == "SASL_SSL"
    assert isinstance(credentials.ssl_context, ssl.SSLContext)
    kwargs = aiokafka_security_kwargs(settings)
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)


def test_ssl_translation(tls):
    settings = load_settings(kafka_security_protocol="SSL", kafka_ssl_cafile=str(tls["ca"].certfile))
    credentials = faust_broker_credentials(settings)
    assert isinstance(credentials, faust.SSLCredentials)
    assert credentials.protocol.value == "SSL"
    kwargs = aiokafka_security_kwargs(settings)
    assert set(kwargs) == {"security_protocol", "ssl_context"}
    assert kwargs["security_protocol"] == "SSL"


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"])
def test_faust_and_aiokafka_agree(tls, protocol):
    values = {"kafka_security_protocol": protocol}
    if protocol.startswith("SASL_"):
        values.update(kafka_sasl_username=SASL_USER, kafka_sasl_password=SASL_PASSWORD)
    if protocol.endswith("SSL"):
        values["kafka_ssl_cafile"] = str(tls["ca"].certfile)
    settings = load_settings(**values)
    # Faust's own conversion of the credentials is what its producer and consumer receive.
    from_faust = dict(credentials_to_aiokafka_auth(faust_broker_credentials(settings)))
    ours = aiokafka_security_kwargs(settings)
    faust_context = from_faust.pop("ssl_context", None)
    our_context = ours.pop("ssl_context", None)
    assert isinstance(faust_context, ssl.SSLContext) == protocol.endswith("SSL")
    assert isinstance(our_context, ssl.SSLContext) == protocol.endswith("SSL")
    assert from_faust == ours


def test_ssl_context_verifies_with_cafile(tls):
    context = kafka_ssl_context(load_settings(kafka_security_protocol="SSL", kafka_ssl_cafile=str(tls["ca"].certfile)))
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    subjects = [dict(part[0] for part in certificate["subject"]) for certificate in context.get_ca_certs()]
    assert {"commonName": "profilestream test ca"} in subjects


def test_ssl_context_loads_client_certificate(tls):
    settings = load_settings(kafka_security_protocol="SSL", kafka_ssl_cafile=str(tls["ca"].certfile),
                             kafka_ssl_certfile=str(tls["client"].certfile), kafka_ssl_keyfile=str(tls["client"].keyfile))
    assert isinstance(kafka_ssl_context(settings), ssl.SSLContext)


def test_ssl_context_rejects_encrypted_key(tls):
    settings = load_settings(kafka_security_protocol="SSL", kafka_ssl_certfile=str(tls["client"].certfile),
                             kafka_ssl_keyfile=str(tls["encrypted_key"]))
    with pytest.raises(ConfigError) as caught:
        kafka_ssl_context(settings)
    assert str(tls["encrypted_key"]) in str(caught.value)
    assert "not encrypted" in str(caught.value)


def test_ssl_context_rejects_non_pem_cafile(tmp_path):
    cafile = tmp_path / "not-a-certificate.pem"
    cafile.write_text("hello\n", encoding="utf-8")
    settings = load_settings(kafka_security_protocol="SSL", kafka_ssl_cafile=str(cafile))
    with pytest.raises(ConfigError) as caught:
        aiokafka_security_kwargs(settings)
    assert "PROFILESTREAM_KAFKA_SSL_CAFILE" in str(caught.value)
    assert str(cafile) in str(caught.value)


# A real SASL_PLAINTEXT listener with the PLAIN mechanism


class SaslPlainBroker(KafkaBroker):
    """A test broker with a second listener, SASL_PLAINTEXT with PLAIN, that accepts one user.

    The PLAINTEXT listener stays for the controller, the readiness probe and replication.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sasl_port: int | None = None

    def _properties(self, controller_port: int) -> dict[str, str]:
        properties = super()._properties(controller_port)
        self.sasl_port = free_port()
        listener = f"SASL_PLAINTEXT://{LOOPBACK}:{self.sasl_port}"
        jaas = (
            "org.apache.kafka.common.security.plain.PlainLoginModule required"
            f' username="{SASL_USER}" password="{SASL_PASSWORD}" user_{SASL_USER}="{SASL_PASSWORD}";'
        )
        properties.update({
            "listeners": f"{properties['listeners']},{listener}",
            "advertised.listeners": f"{properties['advertised.listeners']},{listener}",
            "listener.security.protocol.map": f"{properties['listener.security.protocol.map']},SASL_PLAINTEXT:SASL_PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "sasl.enabled.mechanisms": "PLAIN",
            "listener.name.sasl_plaintext.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config": jaas,
        })
        return properties

    @property
    def sasl_bootstrap_servers(self) -> str:
        assert self.sasl_port is not None
        return f"{LOOPBACK}:{self.sasl_port}"


@pytest.fixture(scope="module")
def sasl_broker():
    with SaslPlainBroker() as broker:
        yield broker


@pytest.fixture(scope="module")
def events_file(tmp_path_factory) -> Path:
    events, _ = stackexchange.convert(FIXTURE)
    path = tmp_path_factory.mktemp("sasl-events") / "events.jsonl"
    jsonl.write_jsonl(events, path)
    return path


async def read_all(settings, topic: str) -> list:
    """Read every record of `topic` through the settings' security, from the beginning to its current end."""
    security = aiokafka_security_kwargs(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers, **security)
    await admin.start()
    try:
        [entry] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions = [TopicPartition(topic, partition["partition"]) for partition in entry["partitions"]]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False, **security)
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records = []
        while [partition for partition in partitions if await consumer.position(partition) < ends[partition]]:
            for batch in (await consumer.getmany(timeout_ms=1000)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


async def test_sasl_plain_worker_end_to_end(sasl_broker, events_file, tmp_path):
    settings = isolated_settings(sasl_broker.sasl_bootstrap_servers, None, tmp_path, min_events_new_user=2, **SASL)
    await asyncio.wait_for(prepare(settings), CLIENT_TIMEOUT_S)
    stats = await replay(events_file, settings, progress=False)
    assert stats.sent > 0
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        committed = await wait_until_caught_up(settings, timeout_s=CATCH_UP_TIMEOUT_S,
                                               on_poll=lambda *_: worker.check_alive())
        samples = worker.metrics()
    finally:
        worker.stop()
    assert committed >= stats.sent
    applied = sum(value for (name, labels), value in samples.items()
                  if name == "profilestream_events_total" and ("outcome", "applied") in labels)
    assert applied > 0
    profiles = await read_all(settings, settings.topic_profiles)
    assert profiles, f"no profiles on {settings.topic_profiles}; log:\n{worker.log_tail()}"


async def test_sasl_wrong_password_rejected(sasl_broker, tmp_path):
    settings = isolated_settings(sasl_broker.sasl_bootstrap_servers, None, tmp_path,
                                 **{**SASL, "kafka_sasl_password": "wrong-password"})
    with pytest.raises(KafkaError):
        await asyncio.wait_for(prepare(settings), CLIENT_TIMEOUT_S)


async def test_sasl_listener_rejects_plaintext_client(sasl_broker, tmp_path):
    settings = isolated_settings(sasl_broker.sasl_bootstrap_servers, None, tmp_path)
    with pytest.raises(KafkaError):
        await asyncio.wait_for(prepare(settings), CLIENT_TIMEOUT_S)

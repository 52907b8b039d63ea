"""Log formats, the repeat limit, secret redaction, and the log of a real worker."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest_asyncio

from handlers.errors import InvalidRecord
from handlers.generation.service import ProfileGenerator
from stream.generate import GenerationStage
from stream.importers import jsonl, stackexchange
from stream.ingest import IngestStage
from stream.logs import (
    REDACTED,
    ConsoleFormatter,
    JsonFormatter,
    LogOptions,
    RepeatLimitFilter,
    build_handler,
    dsn_passwords,
    parse_event,
    secrets_of,
)
from stream.progress import wait_until_caught_up
from stream.records import Record
from stream.replay import replay
from stream.services.ports import free_port
from stream.settings import load_settings
from stream.worker import prepare
from tests.worker_harness import WorkerProcess, isolated_settings

FIXTURE = Path(__file__).parent / "fixtures" / "stackexchange"
REPO = Path(__file__).parent.parent
API_KEY = "sk-test-secret-" + uuid.uuid4().hex
DB_PASSWORD = "pg-test-secret-" + uuid.uuid4().hex
TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


class ManualClock:
    """A clock that moves only when the test advances it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def capture(handler_or_options) -> tuple[logging.Logger, io.StringIO]:
    """Return a fresh logger that writes only to a StringIO through the given handler or options."""
    stream = io.StringIO()
    if isinstance(handler_or_options, LogOptions):
        handler = build_handler(handler_or_options, stream)
    else:
        handler = handler_or_options
        handler.setStream(stream)
    logger = logging.getLogger(f"test.logs.{uuid.uuid4().hex[:8]}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    return logger, stream


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def limited_handler(limit: int, clock: ManualClock, formatter: logging.Formatter) -> logging.Handler:
    handler = logging.StreamHandler()
    handler.addFilter(RepeatLimitFilter(limit, clock=clock))
    handler.setFormatter(formatter)
    return handler


# Formats


def test_json_line_fields():
    logger, stream = capture(LogOptions(format="json"))
    logger.warning("sink.write_failed sink=%s attempt=%d", "postgres", 3)
    [line] = lines(stream)
    document = json.loads(line)
    assert re.fullmatch(TIMESTAMP, document["time"])
    assert document["level"] == "WARNING"
    assert document["logger"] == logger.name
    assert document["message"] == "sink.write_failed sink=postgres attempt=3"
    assert document["event"] == "sink.write_failed"
    assert document["sink"] == "postgres"
    assert document["attempt"] == "3"


def test_json_free_text_value():
    logger, stream = capture(LogOptions(format="json"))
    logger.warning("llm_fallback outcome=timeout detail=%s", "no reply within 30 s; raise timeout_s")
    document = json.loads(lines(stream)[0])
    assert document["event"] == "llm_fallback"
    assert document["outcome"] == "timeout"
    assert document["detail"] == "no reply within 30 s; raise timeout_s"


def test_json_library_prose_has_no_event():
    logger, stream = capture(LogOptions(format="json"))
    logger.info("generation id 1 app consumers id 1")
    document = json.loads(lines(stream)[0])
    assert "event" not in document
    assert document["message"] == "generation id 1 app consumers id 1"


def test_json_extra_fields():
    logger, stream = capture(LogOptions(format="json"))
    logger.info("batch.done", extra={"records": 12, "level": "shadowed"})
    document = json.loads(lines(stream)[0])
    assert document["records"] == 12
    assert document["level"] == "INFO"


def test_json_exception_field():
    logger, stream = capture(LogOptions(format="json"))
    try:
        raise ValueError("broken value 7")
    except ValueError:
        logger.exception("stage.crashed stage=%s", "ingest")
    [line] = lines(stream)
    document = json.loads(line)
    assert document["level"] == "ERROR"
    assert "Traceback" in document["exception"]
    assert "ValueError: broken value 7" in document["exception"]


def test_console_line_format():
    logger, stream = capture(LogOptions(format="console"))
    logger.info("http.serving address=%s", "http://127.0.0.1:6066")
    [line] = lines(stream)
    assert re.fullmatch(rf"{TIMESTAMP} INFO    {re.escape(logger.name)} http\.serving address=http://127\.0\.0\.1:6066", line)


def test_parse_event_quoted_value():
    event, pairs = parse_event('profile.written note="two words" version=3')
    assert event == "profile.written"
    assert pairs == {"note": "two words", "version": "3"}


def test_library_loggers_routed():
    script = (
        "import faust, mode, aiokafka, asyncpg, logging\n"
        "from stream.logs import LogOptions, configure_logging\n"
        "configure_logging(LogOptions(format='json'))\n"
        "for name in ('aiokafka.conn', 'faust.worker', 'mode.services', 'asyncpg.pool'):\n"
        "    logging.getLogger(name).warning('library line from %s', name)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    documents = [json.loads(line) for line in result.stderr.splitlines()]
    assert result.returncode == 0
    assert [document["logger"] for document in documents] == ["aiokafka.conn", "faust.worker", "mode.services", "asyncpg.pool"]


# Repeat limit


def test_repeat_limit_drops_beyond_limit():
    clock = ManualClock()
    logger, stream = capture(limited_handler(3, clock, ConsoleFormatter()))
    for attempt in range(10):
        logger.warning("sink.retry attempt=%s", attempt)
    assert len(lines(stream)) == 3


def test_repeat_limit_reports_suppressed():
    clock = ManualClock()
    logger, stream = capture(limited_handler(3, clock, ConsoleFormatter()))
    for attempt in range(10):
        logger.warning("sink.retry attempt=%s", attempt)
    clock.advance(60)
    logger.warning("sink.retry attempt=%s", 10)
    output = lines(stream)
    assert len(output) == 4
    assert output[-1].endswith("sink.retry attempt=10 suppressed=7")


def test_repeat_limit_suppressed_in_json():
    clock = ManualClock()
    logger, stream = capture(limited_handler(1, clock, JsonFormatter()))
    for _ in range(3):
        logger.warning("sink.retry")
    clock.advance(60)
    logger.warning("sink.retry")
    assert json.loads(lines(stream)[-1])["suppressed"] == 2


def test_repeat_limit_per_template():
    clock = ManualClock()
    logger, stream = capture(limited_handler(2, clock, ConsoleFormatter()))
    for _ in range(5):
        logger.warning("first.template")
        logger.warning("second.template")
    assert len(lines(stream)) == 4


def test_repeat_limit_per_logger():
    clock = ManualClock()
    repeat_filter = RepeatLimitFilter(1, clock=clock)
    records = [logging.LogRecord(name, logging.INFO, __file__, 1, "same.template", None, None) for name in ("a", "b", "a")]
    assert [repeat_filter.filter(record) for record in records] == [True, True, False]


def test_repeat_limit_passes_audit_events():
    clock = ManualClock()
    logger, stream = capture(limited_handler(3, clock, ConsoleFormatter()))
    for n in range(1000):
        logger.info("user.erased user_id=%s event_id=%s", f"user-{n}", f"e{n}")
        logger.info("user.erasedish user_id=%s", f"user-{n}")
    output = lines(stream)
    assert sum(" user.erased user_id=" in line for line in output) == 1000
    assert sum(" user.erasedish user_id=" in line for line in output) == 3


class ErasureEmitter:
    """An emitter that keeps the regeneration requests (erasures) that ingest sends and drops every other record."""

    def __init__(self) -> None:
        self.requests: list[Record] = []

    async def dead_letter(self, record, error) -> None: ...

    async def audience(self, user_id, message) -> None: ...

    async def regenerate(self, user_id: str, request: dict) -> None:
        self.requests.append(Record("regenerate", 0, len(self.requests), user_id.encode(), orjson.dumps(request)))

    async def post_index(self, post_id, message) -> None: ...


class EraseRejectingSink:
    name = "rejecting"

    async def write(self, profiles: list[dict]) -> int:
        return len(profiles)

    async def erase(self, user_id: str) -> None:
        raise InvalidRecord("invalid_profile", f"the test sink rejects the erasure of {user_id!r}")


def deletion(n: int) -> Record:
    document = {"schema": "user_deleted.v1", "event_id": f"delete-{n}", "user_id": f"user-{n}",
                "deleted_at": "2024-06-01T12:00:00Z"}
    return Record("users", 0, n, f"user-{n}".encode(), orjson.dumps(document))


def malformed(n: int) -> Record:
    return Record("posts", 0, n, f"user-{n}".encode(), b"{broken " + str(n).encode())


async def test_erasure_audit_lines_not_limited():
    """1,000 erasures within one window: every audit line of ingest and generation reaches the output."""
    clock = ManualClock()
    handler = limited_handler(10, clock, JsonFormatter())
    stream = io.StringIO()
    handler.setStream(stream)
    loggers = [logging.getLogger("stream.ingest"), logging.getLogger("stream.generate")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        emitter = ErasureEmitter()
        ingest = IngestStage(load_settings(), {}, emitter)
        await ingest.handle_batch([record for n in range(1000) for record in (deletion(n), malformed(n))])
        generation = GenerationStage(ProfileGenerator(language="en"), [EraseRejectingSink()])
        await generation.handle_batch(emitter.requests)
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)
    documents = [json.loads(line) for line in lines(stream)]
    erased = [document["user_id"] for document in documents if document.get("event") == "user.erased"]
    assert erased == [f"user-{n}" for n in range(1000)]
    assert sum(document.get("event") == "user.erased_in_sinks" for document in documents) == 1000
    assert sum(document.get("event") == "sink.erase_rejected" for document in documents) == 1000
    assert sum(document.get("event") == "record.dead_lettered" for document in documents) == 10


# Redaction


def test_redact_message_arguments():
    logger, stream = capture(LogOptions(secrets=(API_KEY,)))
    logger.error("llm.failed key=%s", API_KEY)
    output = stream.getvalue()
    assert API_KEY not in output
    assert f"key={REDACTED}" in output


def test_redact_unformattable_message():
    logger, stream = capture(LogOptions(secrets=(API_KEY,)))
    logger.error("llm.failed count=%d", API_KEY)
    output = stream.getvalue()
    assert API_KEY not in output
    assert f"llm.failed count=%d args=('{REDACTED}',)" in output


def test_redact_exception_text():
    logger, stream = capture(LogOptions(format="json", secrets=(DB_PASSWORD,)))
    try:
        raise ConnectionError(f"login failed for password {DB_PASSWORD}")
    except ConnectionError:
        logger.exception("postgres.failed")
    output = stream.getvalue()
    assert DB_PASSWORD not in output
    assert REDACTED in json.loads(output)["exception"]


def test_redact_extra_fields():
    logger, stream = capture(LogOptions(format="json", secrets=(API_KEY,)))
    logger.info("llm.request", extra={"headers": {"Authorization": f"Bearer {API_KEY}"}})
    output = stream.getvalue()
    assert API_KEY not in output
    assert REDACTED in json.loads(output)["headers"]


def test_redact_decoded_dsn_password():
    dsn = "postgresql://profiles:p%40ss-word-9@db.internal:5432/profiles"
    logger, stream = capture(LogOptions(secrets=tuple(dsn_passwords(dsn))))
    logger.error("postgres.failed raw=%s decoded=%s", "p%40ss-word-9", "p@ss-word-9")
    output = stream.getvalue()
    assert "ss-word-9" not in output
    assert output.count(REDACTED) == 2


def test_dsn_passwords_forms():
    assert dsn_passwords("postgresql://u:secret-1@h/db") == ["secret-1"]
    assert dsn_passwords("postgresql://u@h/db?password=secret-2") == ["secret-2"]
    assert dsn_passwords("host=h user=u password='secret 3' dbname=db") == ["secret 3"]
    assert dsn_passwords("postgresql://u@h/db") == []


def test_secrets_of_settings():
    settings = load_settings(postgres_dsn=f"postgresql://u:{DB_PASSWORD}@h/db", llm_api_key=API_KEY)
    assert set(secrets_of(settings)) == {API_KEY, DB_PASSWORD}


# A real worker's log


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def worker_log(kafka_bootstrap, postgres_dsn, module_database, tmp_path_factory):
    """Run a worker whose model calls fail, with a known API key and database password; return its log."""
    workdir = tmp_path_factory.mktemp("logs")
    role = f"secret_{uuid.uuid4().hex[:8]}"
    await _execute(postgres_dsn, f"CREATE ROLE {role} LOGIN PASSWORD '{DB_PASSWORD}'")
    await _execute(module_database, f"GRANT ALL ON SCHEMA public TO {role}; "
                                    f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}; "
                                    f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}")
    parts = urlsplit(module_database)
    role_dsn = urlunsplit(parts._replace(netloc=f"{role}:{DB_PASSWORD}@{parts.hostname}:{parts.port}"))
    settings = isolated_settings(
        kafka_bootstrap, role_dsn, workdir,
        log_format="json", log_level="DEBUG",
        llm_base_url=f"http://127.0.0.1:{free_port()}/v1", llm_model="closed-port-model", llm_api_key=API_KEY,
        llm_timeout_s=5.0, llm_max_retries=1, min_events_new_user=2,
    )
    events, _ = stackexchange.convert(FIXTURE)
    events_path = workdir / "events.jsonl"
    jsonl.write_jsonl(events, events_path)
    await prepare(settings)
    await replay(events_path, settings, progress=False)
    worker = WorkerProcess(settings, workdir / "worker.log").start()
    try:
        await wait_until_caught_up(settings, timeout_s=120, on_poll=lambda *_: worker.check_alive())
    finally:
        worker.stop()
        await _execute(module_database, f"DROP OWNED BY {role}")
        await _execute(postgres_dsn, f"DROP ROLE {role}")
    yield worker.log_path.read_text(errors="replace")


async def _execute(dsn: str, statement: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def test_worker_log_has_no_secrets(worker_log):
    assert API_KEY not in worker_log
    assert DB_PASSWORD not in worker_log


def test_worker_log_records_model_errors(worker_log):
    events = {json.loads(line).get("event") for line in worker_log.splitlines()}
    assert "llm_fallback" in events


def test_worker_log_all_json(worker_log):
    documents = [json.loads(line) for line in worker_log.splitlines()]
    assert len(documents) > 50
    assert all(set(document) >= {"time", "level", "logger", "message"} for document in documents)


def test_worker_log_libraries_routed(worker_log):
    loggers = {json.loads(line)["logger"].split(".")[0] for line in worker_log.splitlines()}
    assert {"aiokafka", "faust", "mode", "openai", "stream", "handlers"} <= loggers

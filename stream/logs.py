"""Logging of the worker: one root handler for every logger, writing console or JSON lines.

Messages follow the form "event.name key=value ...". The JSON format turns that form into
fields. Two filters on the handler drop repeats beyond a per-minute limit and redact the
configured secrets from every record, whichever logger wrote it.
"""

from __future__ import annotations

import functools
import logging
import logging.config
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import parse_qs, unquote, urlsplit

import orjson

from .settings import Settings

# Loggers of libraries that must reach the root handler. Some attach their own handlers
# (mode attaches a NullHandler), and dictConfig removes those from every logger it names.
LIBRARY_LOGGERS = ("aiokafka", "faust", "mode", "asyncpg", "aiohttp", "openai", "httpx", "asyncio")
REDACTED = "[redacted]"
REPEAT_WINDOW_S = 60.0
MAX_TRACKED_MESSAGES = 10_000
# The erasure audit trail, logged by stream.ingest and stream.generate. An operator must be
# able to count every line, so the repeat limit never drops them.
AUDIT_EVENTS = frozenset({"user.erased", "user.erased_in_sinks", "sink.erase_rejected"})

# The attributes every LogRecord has; anything else came in through `extra=`.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime",
                                                                                         "suppressed"}
_EVENT = re.compile(r"^[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)*$")
# A pair starts at a word followed by "=" and runs until the next such word, so the free
# text that messages put last (detail=..., error=...) stays whole.
_PAIR_START = re.compile(r"(?:^|\s)(?=[A-Za-z_][A-Za-z0-9_.]*=)")
_KEYWORD_PASSWORD = re.compile(r"""(?:^|\s)password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)""")


@dataclass(frozen=True)
class LogOptions:
    """Logging options. `format` is "console" or "json", and `secrets` are redacted from every line."""

    format: str = "console"
    level: str = "INFO"
    secrets: tuple[str, ...] = ()
    repeats_per_minute: int = 10

    @classmethod
    def from_settings(cls, settings: Settings) -> LogOptions:
        return cls(format=settings.log_format, level=settings.log_level, secrets=secrets_of(settings),
                   repeats_per_minute=settings.log_repeats_per_minute)


def secrets_of(settings: Settings) -> tuple[str, ...]:
    """Return the secret values of the settings: the LLM API key, the Kafka SASL password and the Postgres DSN's password."""
    secrets = []
    if settings.llm_api_key is not None:
        secrets.append(settings.llm_api_key.get_secret_value())
    if settings.kafka_sasl_password is not None:
        secrets.append(settings.kafka_sasl_password.get_secret_value())
    if settings.postgres_dsn is not None:
        secrets.extend(dsn_passwords(settings.postgres_dsn.get_secret_value()))
    return tuple(secret for secret in secrets if secret)


def dsn_passwords(dsn: str) -> list[str]:
    """Return the password of a URL or keyword DSN, as written and percent-decoded, or [] when it has none."""
    found = []
    if "://" in dsn:
        parts = urlsplit(dsn)
        if parts.password:
            found.append(parts.password)
        found.extend(parse_qs(parts.query).get("password", []))
    else:
        for match in _KEYWORD_PASSWORD.finditer(dsn):
            value = match.group(1)
            if value.startswith("'") and value.endswith("'"):
                value = value[1:-1].replace("\\'", "'").replace("\\\\", "\\")
            found.append(value)
    return sorted({*found, *(unquote(password) for password in found)} - {""})


def configure_logging(options: LogOptions) -> None:
    """Install the root handler, replacing any handler that basicConfig or a library added."""
    logging.config.dictConfig(logging_config(options))


def logging_config(options: LogOptions) -> dict:
    """Return the dictConfig schema of `options`, which faust.Worker takes as `logging_config`.

    Each dictConfig call builds a new handler, because dictConfig closes the old ones.
    """
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"profilestream": {"()": functools.partial(build_handler, options)}},
        "root": {"level": options.level, "handlers": ["profilestream"]},
        "loggers": {name: {"propagate": True} for name in LIBRARY_LOGGERS},
    }


def build_handler(options: LogOptions, stream=None) -> logging.Handler:
    """Return a stream handler (stderr by default) with the repeat limit, redaction and the format of `options`."""
    if options.format not in ("console", "json"):
        raise ValueError(f"log format must be 'console' or 'json', got {options.format!r}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    # The repeat limit keys on the message template, which redaction replaces, so it runs first.
    handler.addFilter(RepeatLimitFilter(options.repeats_per_minute))
    handler.addFilter(RedactionFilter(options.secrets))
    handler.setFormatter(JsonFormatter() if options.format == "json" else ConsoleFormatter())
    return handler


class RepeatLimitFilter(logging.Filter):
    """Pass at most `limit` records per logger and message template in each window of `window_s` seconds.

    Windows are fixed and start at the first record of a key. The first record that passes
    after a window with dropped repeats carries their count in `record.suppressed`, so the
    count of a message that stops repeating is never written. Records whose event name (the
    template up to the first space) is in `exempt_events` always pass.
    """

    def __init__(self, limit: int, *, window_s: float = REPEAT_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic, exempt_events: Iterable[str] = AUDIT_EVENTS) -> None:
        super().__init__()
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self.window_s = window_s
        self.exempt_events = frozenset(exempt_events)
        self._clock = clock
        self._lock = threading.Lock()
        # key -> [window start, records passed in the window, records dropped in the window]
        self._windows: dict[tuple[str, str], list] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        template = str(record.msg)
        if template.split(" ", 1)[0] in self.exempt_events:
            return True
        key = (record.name, template)
        now = self._clock()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window[0] >= self.window_s:
                dropped = 0 if window is None else window[2]
                self._prune(now)
                self._windows[key] = [now, 1, 0]
                if dropped:
                    record.suppressed = dropped
                return True
            if window[1] < self.limit:
                window[1] += 1
                return True
            window[2] += 1
            return False

    def _prune(self, now: float) -> None:
        # Messages rendered with f-strings make a new key per call, so the table is bounded.
        if len(self._windows) < MAX_TRACKED_MESSAGES:
            return
        expired = [key for key, window in self._windows.items() if now - window[0] >= self.window_s]
        for key in expired:
            del self._windows[key]
        if len(self._windows) >= MAX_TRACKED_MESSAGES:
            self._windows.clear()


class RedactionFilter(logging.Filter):
    """Replace every secret in a record's message, arguments, exception, stack and extra fields.

    The filter renders the message (`msg % args`) and stores the redacted text as `msg`
    with no arguments, so later handlers and formatters see only redacted text. Every
    non-empty secret is redacted, however short, so a very short secret garbles lines.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is replaced whole.
        self.secrets = tuple(sorted({secret for secret in secrets if secret}, key=len, reverse=True))

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            # A filter exception would reach the logging call, so show the unformattable parts instead.
            message = f"{record.msg!s} args={record.args!r}"
        record.msg = self.redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        for name, value in list(vars(record).items()):
            if name in _RECORD_ATTRIBUTES:
                continue
            text = value if isinstance(value, str) else repr(value)
            redacted = self.redact(text)
            if redacted != text:
                setattr(record, name, redacted)
        return True


def parse_event(message: str) -> tuple[str | None, dict[str, str]]:
    """Split "event.name key=value ..." into the event and its pairs, or return (None, {}) for other messages.

    The event is a lowercase first word of letters, digits, "_" and ".". A plain word such
    as "generation" counts only when key=value pairs follow, so library prose is left alone.
    A value runs up to the next " key=" or the end of the message. A value in double quotes
    loses the quotes and its backslash escapes.
    """
    event, _, rest = message.partition(" ")
    if not _EVENT.match(event):
        return None, {}
    pairs = {}
    for chunk in _PAIR_START.split(rest)[1:]:
        key, _, value = chunk.partition("=")
        value = value.rstrip()
        if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        pairs[key] = value
    if not pairs and "." not in event and "_" not in event:
        return None, {}
    return event, pairs


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class ConsoleFormatter(logging.Formatter):
    """One readable line: UTC time, level, logger, the message, and suppressed=N after dropped repeats."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname:<7} {record.name} {record.getMessage()}"
        suppressed = getattr(record, "suppressed", 0)
        if suppressed:
            line += f" suppressed={suppressed}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, event and its key=value pairs.

    Pairs parsed from the message and fields passed with `extra=` become top-level keys
    unless they collide with a fixed key, in which case they stay only in `message`.
    """

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        document: dict[str, object] = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        event, pairs = parse_event(message)
        if event is not None:
            document["event"] = event
        extras = {name: value for name, value in vars(record).items() if name not in _RECORD_ATTRIBUTES}
        for name, value in (*pairs.items(), *extras.items()):
            document.setdefault(name, value)
        suppressed = getattr(record, "suppressed", 0)
        if suppressed:
            document["suppressed"] = suppressed
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            document["exception"] = record.exc_text
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(document, default=str).decode()

"""Logging: text or JSON lines, and redaction of secrets as a last line of defence.

The operator is written so that no secret reaches a log line, an Event or a status field. The
redaction here is defence in depth against what was not foreseen: an exception that quotes a
request, a library's debug output, a value echoed in an error message. It applies to every record
before any handler formats it, including kopf's handler that posts log lines as Kubernetes Events:

* values of secret-bearing fields (``password=...``, ``"aws_secret_access_key": "..."``,
  ``token: ...``, ``Authorization: Bearer ...``) and the password in a URL's user info;
* whole private key blocks (PEM and OpenPGP ``-----BEGIN ... PRIVATE KEY...-----``);
* any value registered with `register_secret`, wherever it appears, also in base64.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import logging
import re
import threading
from typing import Any

FORMAT_ENV = "IDM_BACKUP_LOG_FORMAT"
FORMATS = ("text", "json")
REDACTED = "***"

# Libraries that log whole requests and responses (Secrets included) at DEBUG.
NOISY_LOGGERS = ("botocore", "boto3", "urllib3", "kubernetes", "gnupg", "s3transfer")

_KEYWORDS = (
    r"password|passwd|passphrase|secret[_-]?access[_-]?key|secret[_-]?key|client[_-]?secret"
    r"|access[_-]?token|refresh[_-]?token|id[_-]?token|token|api[_-]?key|private[_-]?key|bindpw"
)
# How much of a field's name may stand around the keyword (`aws_secret_access_key`, `ldapPassword`). Bounded,
# like the white space around the separator: unbounded, a long run of letters (a 200 KiB annotation in a
# debug line) made every position try every split of the run, and redaction took minutes.
_KEY_AROUND = 48
# `name: value`, `name=value`, `"name": "value"`; the name may be longer (`aws_secret_access_key`,
# `ldapPassword`). A value opening a structure (`passwordSecretRef: {name: ...}`) is a reference to
# a Secret, not a secret, and is left alone.
_FIELD = re.compile(
    rf"(?i)(?P<key>(?<![\w.-])[\w.-]{{0,{_KEY_AROUND}}}(?:{_KEYWORDS})[\w-]{{0,{_KEY_AROUND}}})(?P<sep>[\"']?\s{{0,8}}[:=]\s{{0,8}})"
    rf"(?P<quote>[\"']?)(?P<value>(?![{{\[(])[^\s\"',;&}}\]]+)"
)
_AUTHORIZATION = re.compile(r"(?i)\b(?P<scheme>bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
# The scheme is bounded for the same reason as a field's name: unbounded, each position of a long word
# scanned to its end for "://".
_URL_PASSWORD = re.compile(
    r"(?P<scheme>(?<![a-z0-9+.-])[a-z][a-z0-9+.-]{0,31}://)(?P<user>[^:/@\s]+):(?P<password>[^@/\s]+)@"
)
_PRIVATE_BLOCK = re.compile(
    r"-----BEGIN (?P<what>[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?)-----.*?(?:-----END [A-Z0-9 ]*-----|\Z)", re.DOTALL
)

# Registered values shorter than this would redact ordinary words; such a secret is weak anyway.
_MIN_REGISTERED = 6
_registered: set[str] = set()
_registered_lock = threading.Lock()


def register_secret(value: str | bytes) -> None:
    """Redact this value (and its base64 form) wherever it appears in a log record from now on."""
    raw = value if isinstance(value, bytes) else value.encode()
    forms = {base64.b64encode(raw).decode()}
    with contextlib.suppress(UnicodeDecodeError):  # binary material: only its base64 can show up in text
        forms.add(raw.decode().strip())
    with _registered_lock:
        _registered.update(form for form in forms if len(form) >= _MIN_REGISTERED)


def redact(text: str) -> str:
    """The text with every secret it is known or seen to contain replaced by ``***``."""
    text = _PRIVATE_BLOCK.sub(
        lambda m: f"-----BEGIN {m['what']}-----{REDACTED}-----END {m['what']}-----", text
    )
    with _registered_lock:
        known = sorted(_registered, key=len, reverse=True)  # a longer value first: one may contain another
    for value in known:
        if value in text:
            text = text.replace(value, REDACTED)
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    text = _AUTHORIZATION.sub(lambda m: f"{m['scheme']} {REDACTED}", text)
    return _FIELD.sub(lambda m: f"{m['key']}{m['sep']}{m['quote']}{REDACTED}", text)


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (and its traceback) in place, so that every handler sees the result."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_idm_redacted", False):
            return True  # a record passes the logger's filter and then each handler's
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        record._idm_redacted = True
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the Kubernetes object if there is one.

    kopf's per-object loggers attach the object as ``k8s_ref``; its namespace and name become fields
    of their own, so that log systems can filter by them without parsing messages.
    """

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, Any] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, dict):
            for field in ("kind", "namespace", "name", "uid"):
                if ref.get(field):
                    entry[field] = ref[field]
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False, default=str)

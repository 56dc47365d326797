"""API keys, per-key rate limits and PII masking for the server (gate.py checks them on each request).

* Keys: `llmk keys create` prints a random key once and stores only its SHA-256 in a JSON keys file. A key
  is 256 random bits, so a plain SHA-256 cannot be brute-forced and is cheap enough to check on every
  request (a password hash such as scrypt protects low-entropy secrets and would cost ~50 ms a request).
  Presented keys are hashed and compared with `hmac.compare_digest` against every stored hash, so neither
  the comparison nor the loop ends early on a partial or first match.
* The keys file is written with mode 0600 from its creation and refused when other users may write to it
  (they could add a key of their own); every entry is type-checked when it is read. `watch_keys` (a task
  of the app) and `reload_keys` (for SIGHUP) re-read it when it changes, so a key removed from the file is
  refused without a restart; a bad new version is logged and the keys loaded before stay in force.
* Nothing here is a module global: the app gets its `KeyStore`, `RateLimiter` and `PiiMasker` when it is
  built (`create_app`), and the auth dependency reads them from `request.app.state.services`.
* Rate limits are token buckets (requests per minute and tokens per minute) per key name, refilled
  continuously; an empty bucket answers 429 with `Retry-After`, the seconds until the request would fit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmkernel.errors import InputError, UserError
from llmkernel.pii import PLACEHOLDERS, PiiDetector
from llmkernel.runs import atomic_write_json

KEY_PREFIX = "llmk-"
ANONYMOUS = "anonymous"  # the caller's name when the server runs without --api_keys
KEYS_FILE_MODE = 0o600
log = logging.getLogger("llmkernel.serve")

# ------------------------------------------------------------------------------------------- API keys


@dataclass(frozen=True)
class ApiKey:
    """One entry of the keys file; `hash` is "sha256:<hex>" of the key, the key itself is never stored."""

    name: str
    hash: str
    created: str
    requests_per_minute: int | None = None  # per-key overrides of --requests_per_minute
    tokens_per_minute: int | None = None


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


# What identifies a version of the keys file: an editor that renames a new file into place changes the
# inode, one that writes in place changes the size or the modification time.
FileVersion = tuple[int, int, int]


class KeyStore:
    """The API keys a server accepts, checked in constant time; `refresh` follows edits of the keys file."""

    def __init__(self, keys: list[ApiKey], path: str | Path | None = None) -> None:
        # A tuple, replaced whole (one assignment) by refresh(): a verify() running meanwhile sees
        # either the old keys or the new ones, never a mix.
        self.keys = tuple(keys)
        self.path = Path(path) if path is not None else None
        self.version: FileVersion | None = None

    @classmethod
    def load(cls, path: str | Path) -> KeyStore:
        """Read a keys file written by `llmk keys create`; InputError if it is missing, malformed or empty."""
        keys, version = _read_keys_file(Path(path))
        if not keys:
            raise InputError(f"{path}: holds no keys; add one with: llmk keys create --keys-file {path}")
        store = cls(keys, path)
        store.version = version
        return store

    def verify(self, presented: str) -> ApiKey | None:
        """The key whose hash matches `presented`, or None; compares against every key, no early exit."""
        digest = hash_key(presented).encode()
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.hash.encode()):
                found = key
        return found

    def refresh(self, force: bool = False) -> bool:
        """Re-read the keys file if it changed since it was last read (always with `force`).

        Returns True when the keys were replaced. Raises InputError for a missing or bad file and keeps
        the keys it had; that version is not read again until the file changes (or `force`). A file
        emptied of keys is a valid version: every key is revoked.
        """
        if self.path is None:
            return False
        version = _file_version(self.path)
        if version == self.version and not force:
            return False
        self.version = version  # set before reading, so a bad version is reported once
        keys, self.version = _read_keys_file(self.path)
        self.keys = tuple(keys)
        return True


def reload_keys(keys: KeyStore, limiter: RateLimiter, force: bool = True) -> bool:
    """Re-read the keys file now (for a SIGHUP handler); logs the outcome, True when the keys changed.

    A bad file is logged and the keys loaded before stay in force. The limiter follows the new per-key limits.
    """
    count = len(keys.keys)
    try:
        if not keys.refresh(force=force):
            return False
    except InputError as error:
        log.error(f"keys file not reloaded, keeping the {count} key(s) loaded before: {error}")
        return False
    limiter.update_keys(keys)
    log.info(f"keys reloaded from {keys.path}: {len(keys.keys)} key(s)")
    return True


async def watch_keys(keys: KeyStore, limiter: RateLimiter, interval_s: float = 1.0) -> None:
    """Poll the keys file every `interval_s` forever (a task of the app's lifespan), so that a key removed
    from the file is refused without a restart."""
    while True:
        await asyncio.sleep(interval_s)
        reload_keys(keys, limiter, force=False)


def _file_version(path: Path) -> FileVersion | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size, status.st_ino


_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_FIELDS = {field.name for field in dataclasses.fields(ApiKey)}


def _read_keys_file(path: Path) -> tuple[list[ApiKey], FileVersion]:
    """The keys of `path` and the version read; InputError (one line, naming the key and the field)."""
    create = f"create one with: llmk keys create --keys-file {path}"
    try:
        with open(path, "rb") as handle:
            status = os.fstat(handle.fileno())  # of the file read, even if it is replaced meanwhile
            if stat.S_ISREG(status.st_mode) and status.st_mode & 0o022:
                raise InputError(
                    f"{path}: the keys file is writable by other users, who could add keys of their own; "
                    f"fix with: chmod 600 {path}"
                )
            text = handle.read().decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"keys file not found: {path}; {create}") from None
    except IsADirectoryError:
        raise InputError(
            f"{path}: is a folder, not a keys file; give a file, e.g. {path / 'keys.json'}"
        ) from None
    except PermissionError:
        raise InputError(f"{path}: cannot read the keys file (permission denied); run as its owner") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a keys file written by `llmk keys create` (not UTF-8 text)") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read the keys file ({error.strerror or error})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not a keys file written by `llmk keys create` ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys", []), list):
        raise InputError(
            f'{path}: not a keys file written by `llmk keys create` (expected {{"keys": [...]}})'
        )
    keys: list[ApiKey] = []
    for index, entry in enumerate(document.get("keys", [])):
        keys.append(_check_entry(path, index, entry, {key.name for key in keys}))
    return keys, (status.st_mtime_ns, status.st_size, status.st_ino)


def _check_entry(path: Path, index: int, entry: Any, taken: set[str]) -> ApiKey:
    name = entry.get("name") if isinstance(entry, dict) else None
    where = f"{path}: key {name!r}" if isinstance(name, str) and name else f"{path}: key #{index + 1}"

    def fail(message: str) -> InputError:
        return InputError(f"{where}: {message}")

    if not isinstance(entry, dict):
        raise fail(f"must be an object with name, hash and created, got {json.dumps(entry)}")
    if unknown := sorted(set(entry) - _FIELDS):
        raise fail(f"unknown field {unknown[0]!r} (known: {', '.join(sorted(_FIELDS))})")
    for field in ("name", "hash", "created"):
        if field not in entry:
            raise fail(f"{field} is missing")
        if not isinstance(entry[field], str):
            raise fail(f"{field} must be a string, got {json.dumps(entry[field])}")
    if not name:
        raise fail("name must not be empty")
    if name in taken:
        raise fail("the name is used by an earlier key; names must be unique")
    if not _HASH.fullmatch(entry["hash"]):
        raise fail("hash must be 'sha256:' and 64 lowercase hex digits, as `llmk keys create` writes it")
    for field in ("requests_per_minute", "tokens_per_minute"):
        value = entry.get(field)
        # bool is an int in Python, but `true` is not a limit
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise fail(f"{field} must be a whole number >= 0, got {json.dumps(value)}")
    return ApiKey(**entry)


def create_key(path: str | Path, name: str | None = None) -> tuple[str, ApiKey]:
    """Add a new random key to the keys file at `path` (created if missing, mode 0600 from the start).

    Returns the key, which the caller shows once: only its hash is written.
    Raises UserError when `name` is already taken, InputError when `path` cannot be written.
    """
    path = Path(path)
    _check_writable(path)
    keys = _read_keys_file(path)[0] if path.exists() else []
    name = name or f"key-{len(keys) + 1}"
    if any(key.name == name for key in keys):
        raise UserError(f"{path}: a key named '{name}' exists already; choose another --name")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    entry = ApiKey(name=name, hash=hash_key(secret), created=datetime.now(UTC).isoformat(timespec="seconds"))
    records = [{k: v for k, v in vars(key).items() if v is not None} for key in [*keys, entry]]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"keys": records}, mode=KEYS_FILE_MODE)
    except OSError as error:
        raise InputError(
            f"{path}: cannot write the keys file ({error.strerror or error}); "
            "choose a --keys-file in a folder you can write to"
        ) from None
    return secret, entry


def _check_writable(path: Path) -> None:
    """InputError naming the fix when `path` is a folder or its folder cannot hold a new file."""
    if path.is_dir():
        raise InputError(
            f"{path}: is a folder; give the keys file inside it, e.g. --keys-file {path / 'keys.json'}"
        )
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the folders missing in between are created
    if not folder.is_dir():
        raise InputError(f"{path}: {folder} is a file, not a folder; choose another --keys-file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(
            f"{path}: the folder {folder} is not writable; choose a --keys-file in a folder you can write "
            f"to, or fix its permissions (ls -ld {folder})"
        )


# ---------------------------------------------------------------------------------------- rate limits


class TokenBucket:
    """Holds up to `capacity` units and refills at `capacity` per minute."""

    def __init__(self, capacity: float, clock: Callable[[], float]) -> None:
        self.capacity = capacity
        self.per_second = capacity / 60.0
        self.clock = clock
        self.level = capacity
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.per_second)
        self.updated = now

    def take(self, amount: float) -> float:
        """Take `amount` and return 0, or take nothing and return the seconds until `amount` fits."""
        self._refill()
        if self.level >= amount:
            self.level -= amount
            return 0.0
        return (amount - self.level) / self.per_second

    def give_back(self, amount: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + amount)

    def charge(self, amount: float) -> None:
        """Take `amount` even if that leaves a debt (for usage only known after the work is done)."""
        self._refill()
        self.level -= amount


class RateLimiter:
    """Per-key request and token buckets; a limit of 0 means unlimited."""

    def __init__(
        self,
        requests_per_minute: int,
        tokens_per_minute: int,
        keys: KeyStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.defaults = (requests_per_minute, tokens_per_minute)
        self.overrides = {key.name: key for key in keys.keys} if keys else {}
        self.clock = clock
        self.buckets: dict[tuple[str, str], TokenBucket | None] = {}

    def limit(self, key_name: str, kind: str) -> int:
        """Per-minute limit of `kind` (requests or tokens) for a key: its own override, else the default."""
        key = self.overrides.get(key_name)
        override = getattr(key, f"{kind}_per_minute", None) if key else None
        return override if override is not None else self.defaults[kind == "tokens"]

    def _bucket(self, key_name: str, kind: str) -> TokenBucket | None:
        if (key_name, kind) not in self.buckets:
            limit = self.limit(key_name, kind)
            self.buckets[key_name, kind] = TokenBucket(limit, self.clock) if limit > 0 else None
        return self.buckets[key_name, kind]

    def update_keys(self, keys: KeyStore) -> None:
        """Follow a reload of the keys file: a removed key loses its buckets, a key whose limit changed
        gets new ones (keeping what it had used, so a lowered limit does not hand out a fresh minute)."""
        new_overrides = {key.name: key for key in keys.keys}
        names = set(self.overrides) | set(new_overrides)
        before = {name: (self.limit(name, "requests"), self.limit(name, "tokens")) for name in names}
        self.overrides = new_overrides
        for name, limits in before.items():
            removed = name not in new_overrides
            for kind, limit in zip(("requests", "tokens"), limits):
                if not removed and self.limit(name, kind) == limit:
                    continue
                old = self.buckets.pop((name, kind), None)
                if not removed and old is not None and (new := self._bucket(name, kind)) is not None:
                    old._refill()
                    new.level = min(new.capacity, old.level)

    def take_request(self, key_name: str) -> float:
        bucket = self._bucket(key_name, "requests")
        return bucket.take(1) if bucket else 0.0

    def token_limit(self, key_name: str) -> int:
        bucket = self._bucket(key_name, "tokens")
        return int(bucket.capacity) if bucket else 0

    def reserve_tokens(self, key_name: str, amount: int) -> float:
        """Reserve the most tokens a request can use (prompt + max_tokens); see `take`."""
        bucket = self._bucket(key_name, "tokens")
        return bucket.take(amount) if bucket else 0.0

    def refund_tokens(self, key_name: str, amount: int) -> None:
        if (bucket := self._bucket(key_name, "tokens")) is not None and amount > 0:
            bucket.give_back(amount)

    def charge_tokens(self, key_name: str, amount: int) -> None:
        if (bucket := self._bucket(key_name, "tokens")) is not None:
            bucket.charge(amount)


# ----------------------------------------------------------------------------------------- PII masking


# The detector's longest e-mail (llmkernel/pii.py): a local part of up to 64 characters, "@", then up to
# 8 labels of 63 characters and a dot, and a TLD of up to 24 letters.
EMAIL_LOCAL_MAX = 64
EMAIL_DOMAIN_MAX = 8 * 64 + 24
LONGEST_MATCH = EMAIL_LOCAL_MAX + 1 + EMAIL_DOMAIN_MAX
# A run of characters that can be in an e-mail, read backwards from the end of the text.
_EMAIL_RUN_REVERSED = re.compile(r"[A-Za-z0-9\u00c0-\u024f._%+\-@]*")


class PiiMasker:
    """The PII detector of `llmk prepare`, applied to logs (always) and to model inputs/outputs (opt-in)."""

    # More than the longest match the detector finds except e-mail addresses (IPv6 with a zone: 62 chars,
    # phone numbers 40, IBANs 42), with the characters around it that decide whether it counts.
    STREAM_HOLD_CHARS = 64

    def __init__(self, types: list[str]) -> None:
        self.detector = PiiDetector(types)

    def mask(self, text: str) -> str:
        return self.detector.mask(text)[0]

    def preview(self, text: str, chars: int) -> str:
        """The first `chars` characters of `text` with PII masked (masked first, then cut)."""
        if chars <= 0:
            return ""
        # Every match that starts in the first `chars` characters ends inside this prefix, with the
        # characters after it that decide whether it counts.
        masked = self.mask(text[: chars + LONGEST_MATCH + self.STREAM_HOLD_CHARS])
        return masked[:chars] + ("..." if len(masked) > chars else "")

    def stream(self) -> StreamMasker:
        return StreamMasker(self.detector, self.STREAM_HOLD_CHARS)


class StreamMasker:
    """Masks text that arrives in pieces, giving the same text as masking it whole.

    It holds back the last `hold` characters, which may be the start of a phone number or an address still
    being generated, and further back while the end of the text could still be (part of) an e-mail
    address: from the start of its local part, as long as the domain may still grow (up to the
    detector's longest e-mail). Text before that is released, with the matches in it masked. The last
    `CONTEXT` released characters stay as context, so the detector sees what precedes the held text
    (the 65 characters it reads before an '@', the neighbour that glues "v1.2.3.4").
    """

    CONTEXT = EMAIL_LOCAL_MAX + 2

    def __init__(self, detector: PiiDetector, hold: int) -> None:
        self.detector = detector
        self.hold = hold
        self.text = ""  # context already sent, then the held text
        self.sent = 0  # how many leading characters of `text` are context

    @property
    def pending(self) -> str:
        """The text held back so far."""
        return self.text[self.sent :]

    def feed(self, text: str) -> str:
        """Masked text that can be sent now ("" while everything is held back)."""
        self.text += text
        held = cut = self._hold_start()
        if cut <= self.sent:
            return ""
        spans = self.detector.find(self.text)
        for span in spans:
            if span.end > held:
                # It may still change and uncover a match it overlaps now (one that starts at most `hold`
                # characters before it), as a long e-mail shadows the phone number in its local part.
                cut = min(cut, span.start - self.hold)
        for span in spans:
            if span.start < cut < span.end:
                cut = span.start
        return self._release(cut, spans) if cut > self.sent else ""

    def flush(self) -> str:
        """Everything still held back, masked (call once at the end of the stream)."""
        return self._release(len(self.text), self.detector.find(self.text))

    def _hold_start(self) -> int:
        """Where the text that may still become (part of) PII starts."""
        end = len(self.text)
        start = end - self.hold
        # The run of e-mail characters at the end: an '@' in it whose domain could still grow (it is
        # within the longest domain of the end) makes the run from its local part on an e-mail in the making.
        if "email" in self.detector.types and "@" in self.text[max(self.sent, end - EMAIL_DOMAIN_MAX - 2) :]:
            email = _email_start(self.text, max(self.sent, end - LONGEST_MATCH - 2), end)
            start = min(start, email) if email != -1 else start
        return max(self.sent, start)

    def _release(self, cut: int, spans: list) -> str:
        parts, pos = [], self.sent
        for span in spans:
            if self.sent < span.end <= cut:  # (a span that began in the context: mask the rest of it)
                parts += (self.text[pos : max(pos, span.start)], PLACEHOLDERS[span.type])
                pos = span.end
        parts.append(self.text[pos:cut])
        keep = cut - self.CONTEXT
        # An e-mail whose domain runs up to the cut may still reach past it: keep all of it and the
        # character before it, which decides where its local part starts.
        if "@" in self.text[max(0, cut - EMAIL_DOMAIN_MAX - 2) : cut]:
            email = _email_start(self.text, max(0, cut - LONGEST_MATCH - 2), cut)
            keep = min(keep, email - 2) if email != -1 else keep
        keep = max(0, keep)
        self.text, self.sent = self.text[keep:], cut - keep
        return "".join(parts)


def _email_start(text: str, start: int, end: int) -> int:
    """Where an e-mail that `text[:end]` may still be writing starts, or -1: the run of e-mail characters
    that ends at `end` (looked for back to `start`) holds an '@' whose domain can still grow."""
    run_start = end - _EMAIL_RUN_REVERSED.match(text[start:end][::-1]).end()
    at = text.find("@", max(run_start, end - EMAIL_DOMAIN_MAX - 2), end)
    return -1 if at == -1 else max(run_start, at - EMAIL_LOCAL_MAX)

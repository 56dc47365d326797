"""The keys file: written 0600, type-checked and permission-checked on load, reloaded without a restart."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import sys
import threading
from pathlib import Path

import pytest

from llmkernel.errors import InputError
from llmkernel.runs import atomic_write_json, atomic_write_text
from llmkernel.serve.security import (
    ApiKey,
    KeyStore,
    RateLimiter,
    create_key,
    hash_key,
    reload_keys,
    watch_keys,
)
from tests.conftest import run_llmk
from tests.serve.conftest import running_client

HASH = hash_key("llmk-test")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write_keys(path: Path, entries: list, mode: int = 0o600) -> Path:
    """A keys file as an operator edits it by hand (in place, then chmod)."""
    path.write_text(json.dumps({"keys": entries}))
    path.chmod(mode)
    return path


def entry(name: str = "alice", **fields) -> dict:
    return {"name": name, "hash": HASH, "created": "2025-01-01T00:00:00+00:00", **fields}


# ------------------------------------------------------------------------------------ written 0600


def test_keys_file_is_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)  # a umask that would leave a plain open() world-writable
    try:
        create_key(tmp_path / "keys.json", "alice")
        assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) == 0o600
        (tmp_path / "keys.json").chmod(0o644)  # an existing readable file is replaced by a 0600 one
        create_key(tmp_path / "keys.json", "bob")
        assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) == 0o600
        atomic_write_text(tmp_path / "plain.txt", "x")  # other callers keep the umask's mode
        assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o666
        atomic_write_json(tmp_path / "secret.json", {}, mode=0o640)
        assert stat.S_IMODE((tmp_path / "secret.json").stat().st_mode) == 0o640
    finally:
        os.umask(old)
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_keys_file_is_never_seen_with_a_wider_mode(tmp_path):
    """Watch the folder while keys are added: neither the temp file nor the keys file is ever 0644."""
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for path in tmp_path.iterdir():
                try:
                    seen.add(stat.S_IMODE(path.stat().st_mode))
                except FileNotFoundError:  # a temp file renamed meanwhile
                    pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for number in range(30):
            create_key(tmp_path / "keys.json", f"key-{number}")
    finally:
        done.set()
        watcher.join()
    assert seen == {0o600}


# ----------------------------------------------------------------------------------- checked on load


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            [entry(tokens_per_minute="100")],
            "key 'alice': tokens_per_minute must be a whole number >= 0, got \"100\"",
        ),
        (
            [entry(tokens_per_minute=True)],
            "key 'alice': tokens_per_minute must be a whole number >= 0, got true",
        ),
        (
            [entry(requests_per_minute=-1)],
            "key 'alice': requests_per_minute must be a whole number >= 0, got -1",
        ),
        (
            [entry(requests_per_minute=1.5)],
            "key 'alice': requests_per_minute must be a whole number >= 0, got 1.5",
        ),
        ([entry(name="")], "key #1: name must not be empty"),
        ([entry(), entry(name=7)], "key #2: name must be a string, got 7"),
        ([{"name": "alice", "created": ""}], "key 'alice': hash is missing"),
        (
            [entry(hash="sha256:" + "g" * 64)],
            "key 'alice': hash must be 'sha256:' and 64 lowercase hex digits",
        ),
        ([entry(hash=HASH.upper())], "key 'alice': hash must be 'sha256:'"),
        ([entry(created=20250101)], "key 'alice': created must be a string, got 20250101"),
        ([entry(role="admin")], "key 'alice': unknown field 'role'"),
        ([entry(), entry()], "key 'alice': the name is used by an earlier key"),
        (["alice"], 'key #1: must be an object with name, hash and created, got "alice"'),
    ],
)
def test_bad_entries_are_one_line_naming_the_key_and_the_field(tmp_path, entries, message):
    path = write_keys(tmp_path / "keys.json", entries)
    with pytest.raises(InputError) as error:
        KeyStore.load(path)
    assert str(error.value).startswith(f"{path}: {message}")
    assert "\n" not in str(error.value)


def test_limits_may_be_absent_null_or_zero(tmp_path):
    path = write_keys(
        tmp_path / "keys.json",
        [
            entry("a"),
            entry("b", requests_per_minute=None, tokens_per_minute=0),
            entry("c", requests_per_minute=5),
        ],
    )
    keys = KeyStore.load(path).keys
    assert [(k.name, k.requests_per_minute, k.tokens_per_minute) for k in keys] == [
        ("a", None, None),
        ("b", None, 0),
        ("c", 5, None),
    ]


def test_a_file_that_is_not_a_keys_file_is_refused(tmp_path):
    for text in ("[1, 2]", '{"keys": {}}', "{not json", ""):
        path = tmp_path / "keys.json"
        path.write_text(text)
        path.chmod(0o600)
        with pytest.raises(InputError, match="not a keys file written by `llmk keys create`"):
            KeyStore.load(path)
    with pytest.raises(InputError, match="is a folder, not a keys file"):
        KeyStore.load(tmp_path)


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_a_keys_file_others_can_write_is_refused(tmp_path, mode):
    path = write_keys(tmp_path / "keys.json", [entry()], mode=mode)
    with pytest.raises(InputError, match=f"writable by other users.*fix with: chmod 600 {path}$"):
        KeyStore.load(path)
    with pytest.raises(InputError, match="chmod 600"):  # and nobody adds a key to it either
        create_key(path, "bob")


def test_a_keys_file_others_can_read_is_accepted(tmp_path):
    path = write_keys(tmp_path / "keys.json", [entry()], mode=0o644)
    assert [key.name for key in KeyStore.load(path).keys] == ["alice"]


# ------------------------------------------------------------------------------ llmk keys create


def test_llmk_keys_create_on_a_bad_file_exits_2_naming_the_field(tmp_path):
    path = write_keys(tmp_path / "keys.json", [entry(tokens_per_minute="100")])
    done = run_llmk("keys", "create", "--keys-file", str(path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "key 'alice': tokens_per_minute must be a whole number >= 0" in done.stderr


def test_llmk_keys_create_where_no_file_can_be_written_exits_2(tmp_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    inside = tmp_path / "a-folder" / "keys.json"
    cases = [
        (tmp_path / "a-file" / "keys.json", "a-file is a file, not a folder; choose another --keys-file"),
        (tmp_path / "a-file" / "sub" / "keys.json", "a-file is a file, not a folder"),
        (tmp_path / "a-folder", f"is a folder; give the keys file inside it, e.g. --keys-file {inside}"),
    ]
    for keys_file, message in cases:
        done = run_llmk("keys", "create", "--keys-file", str(keys_file))
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and done.stdout == ""
    assert not inside.exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into any folder")
def test_llmk_keys_create_in_a_read_only_folder_exits_2(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o500)
    done = run_llmk("keys", "create", "--keys-file", str(folder / "keys.json"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"the folder {folder} is not writable" in done.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux") or not Path("/sys").is_dir(), reason="needs sysfs")
def test_llmk_keys_create_where_the_system_refuses_the_write_exits_2():
    # sysfs takes no new files, even from root: the write itself fails, not a check before it
    done = run_llmk("keys", "create", "--keys-file", "/sys/llmk-test-keys.json")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "choose a --keys-file in a folder you can write to" in done.stderr


# ------------------------------------------------------------------------- reloaded without a restart


def test_refresh_follows_added_removed_and_bad_versions(tmp_path):
    path = tmp_path / "keys.json"
    alice, _ = create_key(path, "alice")
    store = KeyStore.load(path)
    assert store.refresh() is False  # unchanged
    bob, _ = create_key(path, "bob")
    assert store.refresh() is True and store.verify(bob).name == "bob"
    records = json.loads(path.read_text())["keys"]
    write_keys(path, [r for r in records if r["name"] != "alice"])  # revoke alice, editing in place
    assert store.refresh() is True
    assert store.verify(alice) is None and store.verify(bob).name == "bob"
    path.write_text('{"keys": [')  # an editor half-way through its write
    with pytest.raises(InputError, match="not a keys file"):
        store.refresh()
    assert store.verify(bob).name == "bob"  # the keys loaded before stay in force
    assert store.refresh() is False  # that version is reported once
    with pytest.raises(InputError, match="not a keys file"):
        store.refresh(force=True)
    write_keys(path, [])  # every key revoked
    assert store.refresh() is True and store.verify(bob) is None
    path.unlink()
    with pytest.raises(InputError, match="keys file not found"):
        store.refresh()
    assert KeyStore([ApiKey("x", HASH, "")]).refresh() is False  # a store built in code has no file


def test_watch_keys_logs_reloads_and_each_bad_version_once(tmp_path, caplog):
    path = tmp_path / "keys.json"
    create_key(path, "alice")
    store = KeyStore.load(path)
    limiter = RateLimiter(0, 0, store)

    async def scenario() -> None:
        watcher = asyncio.create_task(watch_keys(store, limiter, interval_s=0.01))

        async def until(predicate) -> None:
            for _ in range(500):
                if predicate():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("the watcher did not notice")

        write_keys(path, [*json.loads(path.read_text())["keys"], entry("bob", requests_per_minute=3)])
        await until(lambda: "bob" in limiter.overrides)
        path.write_text("{")
        await until(lambda: any(r.levelno == logging.ERROR for r in caplog.records))
        await asyncio.sleep(0.1)  # ten more polls of the same bad version
        write_keys(path, [entry("carol")])
        await until(lambda: [k.name for k in store.keys] == ["carol"])
        watcher.cancel()

    with caplog.at_level(logging.INFO, logger="llmkernel.serve"):
        asyncio.run(scenario())
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "llmkernel.serve"]
    assert lines[0] == ("INFO", f"keys reloaded from {path}: 2 key(s)")
    errors = [message for level, message in lines if level == "ERROR"]
    assert len(errors) == 1 and "keeping the 2 key(s) loaded before" in errors[0] and str(path) in errors[0]
    assert lines[-1] == ("INFO", f"keys reloaded from {path}: 1 key(s)")
    assert set(limiter.overrides) == {"carol"}


def test_reload_keys_forces_a_read_and_keeps_the_old_keys_on_a_bad_file(tmp_path, caplog):
    path = tmp_path / "keys.json"
    alice, _ = create_key(path, "alice")
    store = KeyStore.load(path)
    limiter = RateLimiter(0, 0, store)
    with caplog.at_level(logging.INFO, logger="llmkernel.serve"):
        assert reload_keys(store, limiter) is True  # forced: read again although unchanged
        path.chmod(0o666)
        assert reload_keys(store, limiter) is False
    assert "chmod 600" in caplog.records[-1].getMessage() and caplog.records[-1].levelno == logging.ERROR
    assert store.verify(alice).name == "alice"


def test_limiter_follows_changed_and_removed_limits():
    clock = FakeClock()
    before = KeyStore(
        [ApiKey("vip", HASH, "", requests_per_minute=1, tokens_per_minute=1000), ApiKey("old", HASH, "")]
    )
    limiter = RateLimiter(100, 0, before, clock=clock)
    assert limiter.take_request("vip") == 0 and limiter.take_request("vip") == pytest.approx(60.0)
    assert limiter.reserve_tokens("vip", 100) == 0  # 900 left
    assert limiter.take_request("old") == 0
    after = KeyStore([ApiKey("vip", HASH, "", requests_per_minute=2, tokens_per_minute=500)])
    limiter.update_keys(after)
    # the new rate applies to what was used: the empty request bucket refills one request in 30 s
    assert limiter.take_request("vip") == pytest.approx(30.0)
    assert limiter.token_limit("vip") == 500
    assert limiter.reserve_tokens("vip", 500) == 0 and limiter.reserve_tokens("vip", 1) > 0  # 900 cut to 500
    assert not [name for name, _ in limiter.buckets if name == "old"]  # a removed key's buckets are gone
    limiter.update_keys(KeyStore([]))
    assert [limiter.take_request("vip") for _ in range(3)] == [0, 0, 0]  # back to the default 100/min


def test_a_removed_key_is_refused_by_the_running_server(bert_dir, tmp_path):
    path = tmp_path / "keys.json"
    alice, _ = create_key(path, "alice")
    bob, _ = create_key(path, "bob")
    store = KeyStore.load(path)
    with running_client(bert_dir, headers={"Authorization": f"Bearer {alice}"}, keys=store) as client:
        services = client.app.state.services
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {bob}"}).status_code == 200
        write_keys(path, [r for r in json.loads(path.read_text())["keys"] if r["name"] != "bob"])
        assert reload_keys(services.keys, services.limiter) is True
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {bob}"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {alice}"}).status_code == 200

"""Run folders: atomic writes, a staging folder that only becomes `--out` when complete, and run.json.

Every stage writes into one output folder with a `run.json` manifest (stage, package version, resolved
config, inputs with content hashes, outputs, metrics, wall time). A stage builds its output in a staging
folder beside `--out` and renames it into place at the end, so an interrupted or failed run never leaves a
folder that looks complete, and an earlier complete output stays untouched until the new one is ready.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmkernel import __version__
from llmkernel.errors import InputError, UserError

MANIFEST = "run.json"


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path` through a temp file in the same folder: fsync, then rename.

    `mode` (such as 0o600 for a file of secrets) is the file's mode from the moment it is created, so the
    data is never readable under the default umask; the rename keeps it. None: the umask decides.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if mode is None:
            handle = open(tmp, "wb")
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()  # a leftover of a crashed run may have another mode; O_EXCL creates ours
            descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            os.fchmod(descriptor, mode)  # the umask may have removed bits of `mode`
            handle = os.fdopen(descriptor, "wb")
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        failure = out_of_room(
            error, str(path), f"{path.name} is as it was" if path.exists() else "nothing written"
        )
        if failure is None:
            raise
        raise failure from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


# A write that failed because the disk is full, a quota or a file-size limit was reached. torch.save reports
# these without an errno ("unexpected pos N vs M", "iostream error", "file write failed"), so its messages
# are matched too; safetensors says "os error 28/27".
_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EFBIG: "a file-size limit was reached",
    errno.EDQUOT: "the disk quota is exceeded",
}
_WRITE_MESSAGES = (
    "No space left",
    "File too large",
    "Disk quota",
    "os error 28",
    "os error 27",
    "os error 122",
    "iostream error",
    "unexpected pos",
    "file write failed",
)


def write_failure(error: BaseException) -> str | None:
    """Why `error` (or an error it came from) is a failed write for lack of room; None if it is not one."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
            return _WRITE_ERRNOS[error.errno]
        if any(message in str(error) for message in _WRITE_MESSAGES):
            return "no space left on the device or a file-size limit reached"
        error = error.__cause__ or error.__context__
    return None


def out_of_room(error: BaseException, what: str, kept: str) -> InputError | None:
    """The one-line error for a write of `what` that failed for lack of room (None for other errors);
    `kept` says what is still as it was."""
    reason = write_failure(error)
    if reason is None:
        return None
    return InputError(f"could not write {what}: {reason}; free some space or choose another --out ({kept})")


def atomic_write_json(path: str | Path, obj: Any, mode: int | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", mode)


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def describe_inputs(paths: list[Path]) -> list[dict[str, Any]]:
    """Path, size and sha256 of each input file (what run.json records and the up-to-date check compares);
    a folder (a BEIR retrieval set) stands for every file in it."""
    files = [
        f for p in paths for f in (sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p])
    ]
    return [{"path": str(p), "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files]


def fingerprint(config: dict[str, Any], inputs: list[dict[str, Any]], run_only: tuple[str, ...] = ()) -> str:
    """A hash of what determines a stage's output: its config and its inputs' contents.

    `run_only` names the fields that say how to run, not what comes out (`out`, `progress`,
    `train.threads`: a dotted name reaches into a section); they are left out, so changing them
    neither re-runs a finished stage nor stops a resume.
    """
    config = json.loads(json.dumps(config))  # a deep copy to prune
    for name in run_only:
        *sections, field = name.split(".")
        section = config
        for key in sections:
            section = section.get(key, {}) if isinstance(section, dict) else {}
        if isinstance(section, dict):
            section.pop(field, None)
    payload = json.dumps(
        {"config": config, "inputs": [(i["path"], i["sha256"]) for i in inputs]}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def is_up_to_date(folder: str | Path, stage: str, run_fingerprint: str) -> bool:
    """True when `folder` holds a complete run of `stage` with the same config and inputs."""
    manifest = read_manifest(folder)
    return bool(
        manifest and manifest.get("stage") == stage and manifest.get("fingerprint") == run_fingerprint
    )


def check_writable_parent(out: Path) -> None:
    """Fail early, before any work, when `out` cannot be created."""
    parent = out.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {out}: {probe} is not a writable folder; choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; choose another --out")


def _remove_stale_staging(out: Path) -> None:
    """Remove staging folders of runs of `out` that were killed (SIGKILL leaves them; their pid is gone)."""
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def staging_folder(out: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `out`; on success it replaces `out`, on any error it is removed."""
    out = Path(out)
    check_writable_parent(out)
    created = [folder for folder in out.absolute().parents if not folder.exists()]  # innermost first
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # a failed run leaves no empty folders of its own behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        kept = f"the previous {out} is unchanged" if out.exists() else "nothing was written"
        failure = out_of_room(error, str(out), kept) if not isinstance(error, UserError) else None
        if failure is None:
            raise
        raise failure from None
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def files_into(out: str | Path) -> Iterator[Path]:
    """Yield an empty folder inside `out`; what is written there then replaces the same names in `out`.

    For a model written into a run folder that already holds checkpoints/ and logs: a crash while the
    files are written leaves `out` as it was (the temp folder is removed), never a half-written model.
    """
    out = Path(out)
    temporary = out / f".model-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        yield temporary
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        failure = (
            out_of_room(error, f"the model into {out}", f"{out} is as it was")
            if not isinstance(error, UserError)
            else None
        )
        if failure is None:
            raise
        raise failure from None
    for path in temporary.iterdir():
        target = out / path.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)
    temporary.rmdir()


@dataclass
class Manifest:
    """What run.json records about one run of a stage."""

    stage: str
    config: dict[str, Any]
    inputs: list[dict[str, Any]]
    fingerprint: str
    started_at: float = field(default_factory=time.time)
    metrics: dict[str, Any] = field(default_factory=dict)

    def write(self, folder: Path) -> dict[str, Any]:
        """Write run.json into `folder`, listing every file already there as an output."""
        outputs = [
            {"path": str(p.relative_to(folder)), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        ]
        finished = time.time()
        record = {
            "stage": self.stage,
            "version": __version__,
            "started_at": datetime.fromtimestamp(self.started_at, UTC).isoformat(),
            "finished_at": datetime.fromtimestamp(finished, UTC).isoformat(),
            "wall_time_s": round(finished - self.started_at, 3),
            "host": {
                "name": socket.gethostname(),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
            },
            "fingerprint": self.fingerprint,
            "config": self.config,
            "inputs": self.inputs,
            "outputs": outputs,
            "metrics": self.metrics,
        }
        atomic_write_json(folder / MANIFEST, record)
        return record

"""Complete or absent: how every job publishes its output folder.

A job writes its files under ``output`` and publishes them with one commit step at the end: the
manifest ``_SUCCESS`` (JSON: the job, the attempt, the files that make the result, the run's
summary record), written last and all at once (one PUT on object storage, temp file + rename on
a local disk). A folder without it holds no result, whatever files it has; readers go through
:func:`committed_files` (segray's readers do; README "Reading outputs" shows the recipe).

While a job runs its folder carries ``_ATTEMPT`` (who is writing), so the next run knows the
leftovers of a killed run from a folder it must not touch. ``overwrite`` removes the old
manifest first, then the old files: a reader sees the old result or nothing, never a mix.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import posixpath
import tempfile
import uuid
from typing import Any, Iterable

from segray.config import ConfigError, StorageOptions
from segray.io.fs import get_fs, join, remove_tree

SUCCESS = "_SUCCESS"
ATTEMPT = "_ATTEMPT"
FORMAT = "segray-output/1"


def write_atomic(url: str, data: bytes, storage: StorageOptions | None) -> None:
    """All or nothing: one PUT on object storage; temp file + rename on a local disk."""
    fs, path = get_fs(url, storage)
    if "://" in url and not url.startswith("file://"):
        fs.pipe_file(path, data)
        return
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_manifest(output: str, storage: StorageOptions | None = None) -> dict[str, Any] | None:
    """The committed manifest of ``output``, or None when nothing is committed there."""
    fs, path = get_fs(join(output, SUCCESS), storage)
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(data)
    except ValueError:
        return None  # not ours (an empty Hadoop/Spark marker): no segray result
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def folder_files(output: str, storage: StorageOptions | None = None) -> list[str]:
    """Names (relative to ``output``, '/'-separated) of every file below it."""
    fs, path = get_fs(output, storage)
    root = path.rstrip("/")
    if not fs.exists(root):
        return []
    found = fs.find(root, detail=True, withdirs=False)
    return sorted(n[len(root) + 1:] for n, info in found.items()
                  if info.get("type") == "file" and not n.endswith("/") and n != root)


def committed_files(output: str, storage: StorageOptions | None = None, under: str = "") -> list[str]:
    """URLs of the committed files of ``output`` (those below ``under``, if given).

    Raises ConfigError naming the folder when nothing is committed there."""
    manifest = read_manifest(output, storage)
    if manifest is None:
        raise ConfigError(f"{output}: no committed result here (no {SUCCESS}: the run did not finish, "
                          "or this is not a segray output)")
    prefix = under.strip("/") + "/" if under else ""
    return [join(output, f) for f in manifest["files"] if f.startswith(prefix)]


def _remove(output: str, names: Iterable[str], storage: StorageOptions | None) -> None:
    for name in names:
        fs, path = get_fs(join(output, name), storage)
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass


class Publication:
    """One job's output folder, published complete or not at all.

    ``prepare()`` before any cluster work, ``commit(record)`` at the end; in between the job
    writes its files under ``output`` (names of its own choosing, listed at commit).
    """

    def __init__(self, output: str, storage: StorageOptions | None, job: str, overwrite: bool = False,
                 resume: bool = False, field: str = "output"):
        self.output, self.storage, self.job = output, storage, job
        self.overwrite, self.resume, self.field = overwrite, resume, field
        self.attempt = uuid.uuid4().hex[:12]

    def prepare(self) -> dict[str, Any] | None:
        """Make room for this attempt. Returns the committed manifest when ``resume`` finds the
        job already complete (nothing to do); otherwise None.

        A committed result is refused unless ``overwrite`` (or kept, with ``resume``); the
        leftovers of a killed run (``_ATTEMPT`` without ``_SUCCESS``) are cleared, or kept for
        the job to reuse with ``resume``; a folder that is neither is refused unless ``overwrite``.
        """
        manifest = read_manifest(self.output, self.storage)
        files = folder_files(self.output, self.storage)
        if manifest is not None and self.resume and not self.overwrite:
            return manifest
        if manifest is not None and not self.overwrite:
            raise ConfigError(f"{self.field}: {self.output} already holds a committed result "
                              "(set overwrite=true to replace it, or resume=true to keep it)")
        leftovers = ATTEMPT in files or SUCCESS in files
        if files and not leftovers and not self.overwrite:
            raise ConfigError(f"{self.field}: {self.output} is not empty and not a segray output "
                              f"(e.g. {files[0]}; set overwrite=true to replace it)")
        if manifest is not None or (files and not self.resume):
            self.uncommit()
            remove_tree(self.output, self.storage)
        self.mark()
        return None

    def uncommit(self) -> None:
        """The manifest goes first, so the folder never looks committed with files missing."""
        _remove(self.output, [SUCCESS], self.storage)

    def mark(self) -> None:
        started = {"job": self.job, "attempt": self.attempt, "started_at": _now()}
        write_atomic(join(self.output, ATTEMPT), json.dumps(started).encode(), self.storage)

    def commit(self, record: dict[str, Any], files: list[str] | None = None,
               exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """Publish: the manifest lists ``files`` (default: every file now below ``output`` but the
        markers and names under ``exclude``) and carries ``record``; nothing is committed before."""
        if files is None:
            files = [f for f in folder_files(self.output, self.storage)
                     if f not in (SUCCESS, ATTEMPT) and not posixpath.basename(f).startswith(".tmp-")
                     and not any(f == e or f.startswith(e.rstrip("/") + "/") for e in exclude)]
        manifest = {"format": FORMAT, "job": self.job, "attempt": self.attempt, "committed_at": _now(),
                    "files": sorted(files), "record": record}
        write_atomic(join(self.output, SUCCESS), json.dumps(manifest, indent=1, default=str).encode(), self.storage)
        _remove(self.output, [ATTEMPT], self.storage)
        return manifest


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def resolve_checkpoint(url: str, storage: StorageOptions | None = None) -> str:
    """The checkpoint file of ``url``: a ``.pt`` file, a folder holding ``checkpoint.pt``, or a
    committed training run's folder (its ``_SUCCESS`` names the best checkpoint)."""
    from segray.core.checkpoint import FILENAME

    if url.endswith(".pt"):
        return url
    manifest = read_manifest(url, storage)
    if manifest is not None and manifest.get("job") == "train":
        return join(manifest["record"]["best_checkpoint"], FILENAME)
    return join(url, FILENAME)

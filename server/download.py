"""The work behind `longserve download` (server/download_cli.py holds the command line and the contract):
resolve the revision, choose the files, check the free space, fetch them with huggingface_hub into the
destination, verify what the engine will read, write the completion marker.

Failures come out as `DownloadError` with the command's exit code; `_hub_errors` maps the library's and the
HTTP client's exceptions onto those codes.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import shutil
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterator

from longserve.server.download_cli import (
    EXIT_NETWORK,
    EXIT_NO_SPACE,
    EXIT_NOT_FOUND,
    EXIT_UNAUTHORIZED,
    EXIT_UNEXPECTED,
    EXIT_VERIFY,
    MARKER,
    SPACE_HEADROOM,
    DownloadError,
)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SPARSE = "sparse_attention_config.json"
# A safetensors header is JSON of a few hundred KB at most; anything larger is a corrupt length field.
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int | None
    sha256: str | None        # only for large (LFS) files, from the Hub's metadata


def download(repo_id: str, revision: str, dest: str, *, model_uri: str, token: str | None,
             include: tuple[str, ...], max_workers: int, verify_sha256: bool,
             log: Callable[[str], None]) -> dict:
    """Fetch `repo_id` at `revision` into `dest`, verify it, write the marker; returns the marker's content."""
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.utils import disable_progress_bars

    if constants.is_offline_mode():
        raise DownloadError(EXIT_NETWORK, "offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE): "
                                          "unset it to download")
    disable_progress_bars()          # one log line per file instead of bars in a Job's log
    endpoint = os.environ.get("HF_ENDPOINT") or None
    with _hub_errors(f"hf://{repo_id}@{revision}"):
        info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision, files_metadata=True)
    commit = info.sha or revision
    files = select_files(info.siblings or [], include)
    check_needed(files, repo_id, revision)
    try:
        os.makedirs(dest, exist_ok=True)
    except OSError as e:
        raise _os_error(e, dest) from None
    check_space(dest, files)
    total = sum(f.size or 0 for f in files)
    log(f"hf://{repo_id}@{revision} is commit {commit}: {len(files)} files, {total / 2**30:.2f} GiB into {dest}")

    lock = threading.Lock()
    done = [0]

    def fetch(f: RemoteFile) -> None:
        with _hub_errors(f"{f.name} of hf://{repo_id}@{commit}"):
            hf_hub_download(repo_id, f.name, revision=commit, local_dir=dest, token=token, endpoint=endpoint)
        with lock:
            done[0] += 1
            log(f"[{done[0]}/{len(files)}] {f.name} ({(f.size or 0) / 2**20:.1f} MiB)")

    with ThreadPoolExecutor(max_workers=min(max_workers, max(1, len(files)))) as pool:
        for future in [pool.submit(fetch, f) for f in files]:
            future.result()          # the first failure is raised; the pool finishes the others first
    verify(dest, files, check_sha256=verify_sha256)
    marker = {"model": model_uri, "revision": revision, "commit": commit,
              "files": [{"name": f.name, "size": os.path.getsize(os.path.join(dest, f.name))} for f in files],
              "completed_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    marker["bytes"] = sum(e["size"] for e in marker["files"])
    write_marker(dest, marker)
    return marker


def select_files(siblings, include: tuple[str, ...]) -> list[RemoteFile]:
    """The repository files matching any of `include` (shell globs on the path within the repository)."""
    out = []
    for s in siblings:
        name = s.rfilename
        if name.startswith(".") or not any(fnmatch.fnmatch(name, pat) for pat in include):
            continue
        lfs = getattr(s, "lfs", None)
        out.append(RemoteFile(name, s.size if s.size is not None else getattr(lfs, "size", None),
                              getattr(lfs, "sha256", None)))
    return sorted(out, key=lambda f: f.name)


def check_needed(files: list[RemoteFile], repo_id: str, revision: str) -> None:
    """Fail before fetching anything when the selection lacks what the engine needs to start."""
    names = {f.name for f in files}
    missing = [n for n in ("config.json", "tokenizer.json") if n not in names]
    if INDEX not in names and SINGLE not in names:
        missing.append(f"{INDEX} or {SINGLE}")
    if missing:
        raise DownloadError(EXIT_NOT_FOUND, f"hf://{repo_id}@{revision} has no {', '.join(missing)} among the "
                                            f"selected files: the engine cannot serve it")


def free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free


def check_space(dest: str, files: list[RemoteFile]) -> None:
    """The bytes still to fetch (files absent or of another size) must fit in `dest`'s filesystem."""
    needed = 0
    for f in files:
        local = os.path.join(dest, f.name)
        have = os.path.getsize(local) if os.path.isfile(local) else None
        if f.size is not None and have != f.size:
            needed += f.size - (have or 0) if have is not None and have < f.size else f.size
    free = free_bytes(dest)
    if needed + SPACE_HEADROOM > free:
        raise DownloadError(EXIT_NO_SPACE, f"not enough free space in {dest}: {needed / 2**30:.2f} GiB to fetch "
                                           f"(+{SPACE_HEADROOM // 2**20} MiB headroom), {free / 2**30:.2f} GiB free")


def verify(dest: str, files: list[RemoteFile], *, check_sha256: bool = False) -> None:
    """Every selected file present at the Hub's size; the JSON files parse; every shard the index names is
    present; every safetensors file is whole (its header's last tensor ends at the file's end)."""
    problems = []
    for f in files:
        path = os.path.join(dest, f.name)
        if not os.path.isfile(path):
            problems.append(f"{f.name}: missing")
            continue
        size = os.path.getsize(path)
        if f.size is not None and size != f.size:
            problems.append(f"{f.name}: {size} bytes, the Hub has {f.size}")
            continue
        if f.name.endswith(".json"):
            try:
                with open(path, encoding="utf-8") as fh:
                    json.load(fh)
            except (OSError, ValueError) as e:
                problems.append(f"{f.name}: not valid JSON ({e})")
        elif f.name.endswith(".safetensors"):
            problems.extend(_safetensors_problems(path, f.name, size))
        if check_sha256 and f.sha256 and _sha256(path) != f.sha256:
            problems.append(f"{f.name}: SHA-256 differs from the Hub's")
    names = {f.name for f in files}
    if INDEX in names and os.path.isfile(os.path.join(dest, INDEX)):
        try:
            with open(os.path.join(dest, INDEX), encoding="utf-8") as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            problems.append(f"{INDEX}: no weight_map ({e})")
            shards = []
        problems += [f"{s}: named by {INDEX} but missing" for s in shards
                     if not os.path.isfile(os.path.join(dest, s))]
    if problems:
        raise DownloadError(EXIT_VERIFY, "verification failed in " + dest + ": " + "; ".join(problems))


def _safetensors_problems(path: str, name: str, size: int) -> list[str]:
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return [f"{name}: truncated ({size} bytes)"]
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                return [f"{name}: header length {n} does not fit a {size}-byte file"]
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as e:
        return [f"{name}: unreadable safetensors header ({e})"]
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return [f"{name}: tensors end at byte {8 + n + end}, the file has {size}"]
    return []


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 * 2**20), b""):
            h.update(block)
    return h.hexdigest()


def write_marker(dest: str, marker: dict) -> None:
    """Write the marker under a temporary name, flush it to disk, then rename: readers see all or nothing."""
    tmp = os.path.join(dest, MARKER + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(marker, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, os.path.join(dest, MARKER))
        with contextlib.suppress(OSError):       # make the rename itself durable where the platform allows
            fd = os.open(dest, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as e:
        raise _os_error(e, dest) from None


def _os_error(e: OSError, where: str) -> DownloadError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DownloadError(EXIT_NO_SPACE, f"no space left in {where}: {e}")
    return DownloadError(EXIT_UNEXPECTED, f"{where}: {e}")


@contextlib.contextmanager
def _hub_errors(what: str) -> Iterator[None]:
    """Map the library's exceptions to DownloadError with the command's exit codes."""
    import httpx2
    from huggingface_hub import errors

    try:
        yield
    except DownloadError:
        raise
    except Exception as exc:          # noqa: BLE001 - classified below, re-raised when unknown
        for e in _chain(exc):
            if isinstance(e, errors.GatedRepoError):
                raise DownloadError(EXIT_UNAUTHORIZED, f"{what}: gated repository: accept its terms on the Hub "
                                                       f"with the token's account, and set HF_TOKEN") from exc
            if isinstance(e, (errors.RevisionNotFoundError, errors.RemoteEntryNotFoundError)):
                raise DownloadError(EXIT_NOT_FOUND, f"{what}: {_first_line(e)}") from exc
            if isinstance(e, errors.HfHubHTTPError) and e.response is not None:
                status = e.response.status_code
                if status in (401, 403):
                    raise DownloadError(EXIT_UNAUTHORIZED, f"{what}: unauthorized (HTTP {status}): the token is "
                                        f"missing, invalid or lacks access (the Hub also answers 401 to anonymous "
                                        f"requests for repositories that do not exist)") from exc
                if status == 404:
                    raise DownloadError(EXIT_NOT_FOUND, f"{what}: not found (HTTP 404)") from exc
                if status in (408, 429) or status >= 500:
                    raise DownloadError(EXIT_NETWORK, f"{what}: the Hub answered HTTP {status}") from exc
                raise DownloadError(EXIT_UNEXPECTED, f"{what}: HTTP {status}: {_first_line(e)}") from exc
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DownloadError(EXIT_NO_SPACE, f"{what}: no space left on the device: {e}") from exc
            if isinstance(e, (httpx2.TransportError, errors.OfflineModeIsEnabled, ConnectionError, TimeoutError)):
                raise DownloadError(EXIT_NETWORK, f"{what}: network failure: {type(e).__name__}: {e}") from exc
            if isinstance(e, OSError) and "Consistency check failed" in str(e):
                raise DownloadError(EXIT_NETWORK, f"{what}: the transfer ended early: {_first_line(e)}") from exc
        if isinstance(exc, errors.LocalEntryNotFoundError):   # the library's wrapper for "Hub unreachable"
            raise DownloadError(EXIT_NETWORK, f"{what}: the Hub could not be reached") from exc
        raise


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _first_line(e: BaseException) -> str:
    return next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)

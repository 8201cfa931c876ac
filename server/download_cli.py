"""`longserve download`: fetch a checkpoint from a Hugging Face Hub endpoint into the directory the engine will
serve, verify it, and mark it complete (docs/image.md#download).

The model Job of the operator runs this in the engine image. The contract it relies on:
- files land directly in `--dest` (config.json at DEST/config.json), fetched at the commit `--revision` resolves
  to when the command starts, so a branch that moves during a download cannot mix two commits;
- a file is written under a temporary name and renamed into place once whole, and the library keeps its
  per-file metadata under DEST/.cache/huggingface/, so a rerun fetches only the files still missing;
- DEST/.longserve-complete.json is written last and atomically (temporary file, fsync, rename); it exists only
  when the files the engine needs are present and verified. When it exists for the same model and revision the
  command exits 0 at once, without network;
- each failure class has its own exit code (below), so a Job can stop retrying the permanent ones.

Only the standard library is imported here; huggingface_hub is imported when the command runs.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

HELP = "download a checkpoint (hf://ORG/NAME at a revision) into a directory, verify it, mark it complete"

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_UNAUTHORIZED = 3
EXIT_NOT_FOUND = 4
EXIT_NO_SPACE = 5
EXIT_NETWORK = 6
EXIT_VERIFY = 7

MARKER = ".longserve-complete.json"
# What the engine reads: configs, tokenizer files, chat templates, safetensors weights. Pickled weights
# (*.bin, *.pt, *.pth) and other formats are never loaded, so they are never fetched.
DEFAULT_INCLUDE = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken")
# Headroom kept free beyond the files themselves (the library's metadata, the filesystem's own needs).
SPACE_HEADROOM = 64 * 1024 * 1024

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


class DownloadError(Exception):
    """A failure with the exit code the command ends with."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("exit codes: 0 complete (or already complete), 2 usage (bad --model, DEST holds another "
                "revision), 3 unauthorized or gated, 4 repository, revision or a needed file not found, "
                "5 not enough free space, 6 network failure (retry), 7 verification failed (retry), "
                "1 anything else. Token: --token-file, else HF_TOKEN. HF_ENDPOINT selects a mirror.")
    p.add_argument("--model", required=True, metavar="hf://ORG/NAME", help="the repository on the Hub")
    p.add_argument("--revision", default="main", help="branch, tag or commit (default main)")
    p.add_argument("--dest", required=True, metavar="DIR",
                   help="the directory to fill: the path `longserve serve --model` is given; use one per revision")
    p.add_argument("--token-file", metavar="PATH",
                   help="read the access token from this file (a mounted Secret); default: the HF_TOKEN variable")
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="download only repository files matching GLOB (repeatable); "
                        f"default: {' '.join(DEFAULT_INCLUDE)}")
    p.add_argument("--max-workers", type=int, default=8, help="files fetched in parallel (default 8)")
    p.add_argument("--verify-sha256", action="store_true",
                   help="also check every large (LFS) file's SHA-256 against the Hub's (reads all the bytes once)")


def run(args: argparse.Namespace) -> int:
    try:
        repo_id = parse_model(args.model)
        if args.max_workers < 1:
            raise DownloadError(EXIT_USAGE, "--max-workers must be at least 1")
        token = read_token_file(args.token_file) if args.token_file else None
        dest = os.path.abspath(args.dest)
        done = read_marker(dest)
        if done is not None and marker_matches(done, args.model, args.revision, dest):
            log(f"already complete: {args.model}@{args.revision} ({done.get('commit')}) in {dest}")
            return EXIT_OK
        # The library keeps its large-file chunk cache under HF_HOME by default; keep it beside the files.
        os.environ.setdefault("HF_XET_CACHE", os.path.join(dest, ".cache", "huggingface", "xet"))
        from longserve.server.download import download
        marker = download(repo_id, args.revision, dest, model_uri=args.model, token=token,
                          include=tuple(args.include or DEFAULT_INCLUDE), max_workers=args.max_workers,
                          verify_sha256=args.verify_sha256, log=log)
    except DownloadError as e:
        log(f"error: {e}")
        return e.code
    gib = marker["bytes"] / 2**30
    log(f"complete: {args.model}@{args.revision} ({marker['commit']}) {len(marker['files'])} files, "
        f"{gib:.2f} GiB in {dest}")
    return EXIT_OK


def parse_model(uri: str) -> str:
    """`hf://ORG/NAME` -> `ORG/NAME`."""
    if not uri.startswith("hf://") or not _REPO_ID.fullmatch(uri[len("hf://"):]):
        raise DownloadError(EXIT_USAGE, f"--model must be hf://ORG/NAME, got {uri!r}")
    return uri[len("hf://"):]


def read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except OSError as e:
        raise DownloadError(EXIT_USAGE, f"--token-file {path}: {e.strerror}") from None
    if not token:
        raise DownloadError(EXIT_USAGE, f"--token-file {path} is empty")
    return token


def read_marker(dest: str) -> dict | None:
    import json

    try:
        with open(os.path.join(dest, MARKER), encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None          # unreadable or torn: treated as absent, the download verifies and rewrites it
    return data if isinstance(data, dict) else None


def marker_matches(marker: dict, model: str, revision: str, dest: str) -> bool:
    """True when the marker records this model and revision and its files are still there at their sizes.
    Raises for a complete download of another model or revision: DEST is not ours to overwrite."""
    if (marker.get("model"), marker.get("revision")) != (model, revision):
        raise DownloadError(EXIT_USAGE, f"{dest} holds a complete download of {marker.get('model')}@"
                                        f"{marker.get('revision')}, not {model}@{revision}: use one --dest per "
                                        f"revision (running pods may be reading these files)")
    for entry in marker.get("files", []):
        try:
            if os.path.getsize(os.path.join(dest, entry["name"])) != entry["size"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} longserve download: {message}", file=sys.stderr, flush=True)

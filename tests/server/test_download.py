"""`longserve download` against a Hub stand-in on 127.0.0.1 (tests/server/fake_hub.py) serving a tiny checkpoint
from server/tiny_checkpoint.py: success and the completion marker, idempotency without network, resume after a
failed attempt and within a file, gated and unauthorized (exit 3), missing repository or revision (4), no
space (5), network failure (6), verification failure (7), usage errors (2), and the installed entry point."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from longserve.server import download as dl
from longserve.server import download_cli as cli
from longserve.server.cli import main
from longserve.server.tiny_checkpoint import build_tiny_checkpoint

from .fake_hub import FakeHub, repo_from_dir

REPO = "acme/tiny-1m"
SPARSE = [{"0": ["vertical_and_slash", 64, 128, 0.9]}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt")), shards=2, sparse_config=SPARSE)


@pytest.fixture
def hub(checkpoint, monkeypatch):
    import huggingface_hub.constants

    # make test exports offline mode for the suite; this command is online by nature
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with FakeHub() as fake:
        # a README and pickled weights the engine never reads: the default selection skips them
        fake.repos[REPO] = repo_from_dir(checkpoint, extra={"README.md": b"# tiny\n", "pytorch_model.bin": b"x" * 99})
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        yield fake


def run(dest, *extra, model=f"hf://{REPO}", revision="main"):
    return main(["download", "--model", model, "--revision", revision, "--dest", str(dest), *extra])


def shards(checkpoint):
    with open(os.path.join(checkpoint, "model.safetensors.index.json")) as fh:
        return sorted(set(json.load(fh)["weight_map"].values()))


def needed_files(checkpoint):
    return sorted(n for n in os.listdir(checkpoint) if not n.endswith((".md", ".bin")))


def test_download_verifies_and_writes_the_marker(hub, checkpoint, tmp_path):
    dest = tmp_path / "acme" / "tiny-1m" / "main"
    assert run(dest) == cli.EXIT_OK
    marker = json.loads((dest / cli.MARKER).read_text())
    assert marker["model"] == f"hf://{REPO}" and marker["revision"] == "main"
    assert marker["commit"] == hub.repos[REPO].commit
    names = [f["name"] for f in marker["files"]]
    assert names == needed_files(checkpoint)
    assert len(shards(checkpoint)) >= 2
    assert {*shards(checkpoint), "tokenizer.json", "sparse_attention_config.json",
            "model.safetensors.index.json"} <= set(names)
    for name in names:
        assert (dest / name).read_bytes() == (open(os.path.join(checkpoint, name), "rb").read())
    assert marker["bytes"] == sum(f["size"] for f in marker["files"])
    assert not (dest / "README.md").exists() and not (dest / "pytorch_model.bin").exists()
    assert not list(dest.rglob("*.incomplete")) and not (dest / (cli.MARKER + ".tmp")).exists()
    # every file was fetched at the resolved commit, not at the moving branch name
    assert all(f"/resolve/{marker['commit']}/" in p for m, p, _ in hub.requests if "/resolve/" in p)


def test_the_engine_loads_the_downloaded_checkpoint(hub, checkpoint, tmp_path):
    from longserve.server.hf_config import find_weight_files, load_checkpoint

    assert run(tmp_path / "d") == cli.EXIT_OK
    got, want = load_checkpoint(str(tmp_path / "d")), load_checkpoint(checkpoint)
    assert (got.facts, got.config, got.sparse_config) == (want.facts, want.config, want.sparse_config)
    assert [os.path.basename(f) for f in find_weight_files(str(tmp_path / "d"))] == shards(checkpoint)


def test_rerun_is_idempotent_and_needs_no_network(hub, tmp_path):
    assert run(tmp_path / "d") == cli.EXIT_OK
    seen = len(hub.requests)
    hub.repos.clear()                      # the Hub would now answer 404 to anything
    assert run(tmp_path / "d") == cli.EXIT_OK
    assert len(hub.requests) == seen


def test_a_missing_file_behind_a_marker_is_fetched_again(hub, checkpoint, tmp_path):
    last = shards(checkpoint)[-1]
    assert run(tmp_path / "d") == cli.EXIT_OK
    os.remove(tmp_path / "d" / last)
    start = len(hub.requests)
    assert run(tmp_path / "d") == cli.EXIT_OK
    assert hub.gets(start) == [last]


def test_resume_after_a_failed_attempt_fetches_only_the_rest(hub, checkpoint, tmp_path):
    first, last = shards(checkpoint)[0], shards(checkpoint)[-1]
    hub.fail_get[last] = 503
    assert run(tmp_path / "d") == cli.EXIT_NETWORK
    assert not (tmp_path / "d" / cli.MARKER).exists()
    assert (tmp_path / "d" / first).exists()
    del hub.fail_get[last]
    start = len(hub.requests)
    assert run(tmp_path / "d") == cli.EXIT_OK
    assert hub.gets(start) == [last]


def test_a_dropped_connection_resumes_within_the_file(hub, checkpoint, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # the library keeps whole read chunks (10 MB) of a broken transfer; small chunks make that visible here
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    name = shards(checkpoint)[0]
    half = os.path.getsize(os.path.join(checkpoint, name)) // 2 // 4096 * 4096
    hub.cut_once[name] = half
    assert run(tmp_path / "d") == cli.EXIT_OK
    ranges = [r for m, p, r in hub.requests if m == "GET" and p.endswith(name)]
    assert ranges == [None, f"bytes={half}-"]
    assert (tmp_path / "d" / name).read_bytes() == open(os.path.join(checkpoint, name), "rb").read()


def test_gated_repository_needs_an_accepted_token(hub, tmp_path, monkeypatch):
    hub.repos[REPO].gated = True
    assert run(tmp_path / "d") == cli.EXIT_UNAUTHORIZED          # anonymous: 401
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    assert run(tmp_path / "d") == cli.EXIT_UNAUTHORIZED          # not on the list: 403
    monkeypatch.setenv("HF_TOKEN", hub.token)
    assert run(tmp_path / "d") == cli.EXIT_OK
    assert not (tmp_path / "d2").exists()


def test_token_file_wins_over_the_environment(hub, tmp_path, monkeypatch):
    hub.repos[REPO].gated = True
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    (tmp_path / "token").write_text(hub.token + "\n")
    assert run(tmp_path / "d", "--token-file", str(tmp_path / "token")) == cli.EXIT_OK
    assert run(tmp_path / "e", "--token-file", str(tmp_path / "absent")) == cli.EXIT_USAGE


def test_missing_repository_or_revision(hub, tmp_path):
    assert run(tmp_path / "d", model="hf://acme/nope") == cli.EXIT_NOT_FOUND
    assert run(tmp_path / "d", revision="v9") == cli.EXIT_NOT_FOUND
    assert not (tmp_path / "d").exists()


def test_a_repository_without_what_the_engine_needs_is_refused_before_fetching(hub, tmp_path):
    del hub.repos[REPO].files["tokenizer.json"]
    assert run(tmp_path / "d") == cli.EXIT_NOT_FOUND
    assert hub.gets() == []


def test_a_shard_named_by_the_index_but_absent_fails_verification(hub, checkpoint, tmp_path):
    del hub.repos[REPO].files[shards(checkpoint)[-1]]
    assert run(tmp_path / "d") == cli.EXIT_VERIFY
    assert not (tmp_path / "d" / cli.MARKER).exists()


def test_not_enough_space_is_refused_before_fetching(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "free_bytes", lambda path: 1024)
    assert run(tmp_path / "d") == cli.EXIT_NO_SPACE
    assert hub.gets() == []


def test_network_failure(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")     # discard port: connection refused
    assert run(tmp_path / "d") == cli.EXIT_NETWORK


def test_offline_mode_is_refused(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert run(tmp_path / "d") == cli.EXIT_NETWORK


def test_usage_errors(hub, tmp_path):
    assert run(tmp_path / "d", model=REPO) == cli.EXIT_USAGE          # no hf:// scheme
    assert run(tmp_path / "d", model="hf://a/b/c") == cli.EXIT_USAGE
    assert run(tmp_path / "d") == cli.EXIT_OK
    # a complete download of another revision is never overwritten
    assert run(tmp_path / "d", revision=hub.repos[REPO].commit) == cli.EXIT_USAGE


def test_verify_finds_truncated_and_malformed_files(checkpoint, tmp_path):
    import shutil

    shutil.copytree(checkpoint, tmp_path / "c")
    files = dl.select_files([type("S", (), {"rfilename": n, "size": None, "lfs": None})()
                             for n in os.listdir(tmp_path / "c")], cli.DEFAULT_INCLUDE)
    dl.verify(str(tmp_path / "c"), files)                              # the original passes
    shard = tmp_path / "c" / shards(checkpoint)[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    (tmp_path / "c" / "config.json").write_text("{not json")
    with pytest.raises(cli.DownloadError) as e:
        dl.verify(str(tmp_path / "c"), files)
    assert e.value.code == cli.EXIT_VERIFY
    assert f"{shards(checkpoint)[0]}: tensors end at byte" in str(e.value)
    assert "config.json: not valid JSON" in str(e.value)


def test_verify_sha256(hub, checkpoint, tmp_path):
    assert run(tmp_path / "d", "--verify-sha256") == cli.EXIT_OK
    info_files = [dl.RemoteFile(shards(checkpoint)[0], None, "0" * 64)]
    with pytest.raises(cli.DownloadError, match="SHA-256 differs"):
        dl.verify(str(tmp_path / "d"), info_files, check_sha256=True)


def test_the_installed_command(hub, tmp_path):
    """The real entry point in a fresh process with the Job's environment: exit codes and the marker."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    env["HF_ENDPOINT"] = hub.url
    cmd = [sys.executable, "-m", "longserve.server.cli", "download", "--model", f"hf://{REPO}", "--dest"]
    ok = subprocess.run(cmd + [str(tmp_path / "d")], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "complete: hf://acme/tiny-1m@main" in ok.stderr
    assert json.loads((tmp_path / "d" / cli.MARKER).read_text())["revision"] == "main"
    missing = subprocess.run(cmd[:-3] + ["--model", "hf://acme/nope", "--dest", str(tmp_path / "e")], env=env,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == cli.EXIT_NOT_FOUND and "not found" in missing.stderr

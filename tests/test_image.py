"""The image's build files hold the promises docs/image.md makes; the build itself and the demo inside the image
are checked by tools/image_check.sh (run by tools/check.sh, i.e. `make test`, as root)."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in DOCKERFILE.splitlines() if not ln.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)]


def test_base_image_and_variant_are_build_arguments_of_a_multi_stage_build():
    ins = _instructions()
    first_from = next(i for i, (op, _) in enumerate(ins) if op == "FROM")
    globals_ = {a.split("=")[0] for op, a in ins[:first_from] if op == "ARG"}
    assert {"BASE_IMAGE", "VARIANT"} <= globals_
    froms = [a for op, a in ins if op == "FROM"]
    assert froms[0] == "${BASE_IMAGE} AS install" and froms[-1] == "${VARIANT}"
    assert {"runtime AS cpu", "runtime AS gpu"} <= set(froms)
    assert any(op == "COPY" and a.startswith("--from=install ") for op, a in ins)


def test_the_build_installs_from_the_wheelhouse_only():
    runs = " ".join(a for op, a in _instructions() if op == "RUN")
    installs = re.findall(r"pip\"? install ([^;]*)", runs)
    assert installs and all("--no-index" in i and "--find-links /wheels" in i for i in installs)
    for tool in ("apt-get", "curl", "wget", "git clone", "--index-url", "--extra-index-url"):
        assert tool not in runs, f"{tool} in a RUN step: the build must need no network"


def test_runs_as_a_fixed_non_root_user_with_the_longserve_entry_point():
    ins = _instructions()
    assert ("USER", "10001:10001") in ins
    assert ("ENTRYPOINT", '["longserve"]') in ins
    assert re.search(r"useradd --uid 10001 --gid 10001", DOCKERFILE)
    labels = " ".join(a for op, a in ins if op == "LABEL")
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    assert 'org.opencontainers.image.revision="${REVISION}"' in labels


def test_dockerignore_sends_only_the_wheelhouses():
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "*"
    assert {"!build/wheelhouse-cpu", "!build/wheelhouse-gpu"} <= set(lines)


def test_make_image_and_the_ci_path():
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^image:", make, re.M)
    dry = subprocess.run(["make", "-n", "image", "VARIANT=cpu", "IMAGE=x/y:z"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "tools/wheelhouse.sh cpu" in dry and "docker build" in dry and "buildah bud" in dry
    assert "--build-arg VARIANT=cpu" in dry and "-t x/y:z" in dry
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^test:.*\n\t.*tools/check\.sh", make, re.M)
    check = (ROOT / "tools" / "check.sh").read_text()
    assert "tools/image_check.sh" in check
    image_check = (ROOT / "tools" / "image_check.sh").read_text()
    for needed in ("LONGSERVE_SKIP_IMAGE", "mmdebstrap", "--storage-driver vfs", "--isolation chroot",
                   "unshare --net", "DEMO_ARGS", "tools/image_smoke.py", "trap cleanup EXIT"):
        assert needed in image_check, needed


def test_wheelhouse_pins_the_torch_build_per_variant():
    text = (ROOT / "tools" / "wheelhouse.sh").read_text()
    assert "cpu) TORCH_PIN='torch==2.13.0+cpu'" in text
    assert "gpu) TORCH_PIN='torch===2.13.0'" in text
    assert "gpu) echo 'triton==3.7.1'" in text       # what the index's CUDA torch 2.13.0 requires
    assert re.search(r"^torch==2\.13\.0$", (ROOT / "constraints.txt").read_text(), re.M)


def test_the_smoke_request_is_the_readmes():
    spec = importlib.util.spec_from_file_location("image_smoke", ROOT / "tools" / "image_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    path, headers, body = smoke.readme_request()
    assert path == "/v1/chat/completions" and headers == {"content-type": "application/json"}
    request = json.loads(body)
    assert request["model"] == "demo-passkey" and request["max_tokens"] == 16
    prompt = request["messages"][0]["content"]
    assert "The pass key is 28884." in prompt and prompt.endswith("What is the pass key?")


def test_the_rendered_pods_run_as_the_images_user():
    """The operator's restricted securityContext names the uid/gid the image creates, and the image's HOME is
    one of the pod's writable scratch paths."""
    from longserve.operator import security

    assert ("USER", f"{security.RUN_AS_USER}:{security.RUN_AS_GROUP}") in _instructions()
    env = " ".join(a for op, a in _instructions() if op == "ENV")
    assert f"HOME={security.SCRATCH_ENV['HOME']}" in env

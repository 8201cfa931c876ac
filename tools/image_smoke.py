"""Send the README's passkey request (its `curl` block, expanded by bash as a reader would) to a demo server on
127.0.0.1:PORT once it is healthy, and check the answer. Used by tools/image_check.sh against the demo model
served inside the built image; standard library only, so it runs with any Python 3.

    python3 tools/image_smoke.py PORT [--wait SECONDS]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANSWER = "The pass key is 28884."


def readme_request() -> tuple[str, dict, bytes]:
    """(path, headers, body) of the README's curl request: bash expands the block with `curl` replaced by a
    function printing its arguments, so the body is exactly what a reader's shell would send."""
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S) if "NEEDLE=" in b]
    if len(blocks) != 1:
        raise SystemExit("image_smoke: expected one ```bash block with NEEDLE= in README.md")
    script = 'curl() { for a in "$@"; do printf "%s\\0" "$a"; done; }\n' + blocks[0]
    argv = subprocess.run(["bash", "-c", script], capture_output=True, check=True, timeout=30).stdout.decode()
    argv = argv.split("\0")[:-1]
    url = next(a for a in argv if "/v1/" in a)
    headers = dict(argv[i + 1].split(": ", 1) for i, a in enumerate(argv) if a == "-H")
    body = argv[argv.index("-d") + 1].encode()
    return "/" + url.split("/", 1)[1], headers, body


def wait_healthy(base: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"image_smoke: {base}/health not ready after {seconds:.0f} s")
        time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--wait", type=float, default=180.0, help="seconds to wait for /health")
    args = parser.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    path, headers, body = readme_request()
    t0 = time.monotonic()
    wait_healthy(base, args.wait)
    print(f"image_smoke: healthy after {time.monotonic() - t0:.1f} s", flush=True)
    req = urllib.request.Request(base + path, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        reply = json.loads(r.read())
    answer = reply["choices"][0]["message"]["content"]
    print(f"image_smoke: answer {answer!r}")
    return 0 if answer.strip() == ANSWER else 1


if __name__ == "__main__":
    sys.exit(main())

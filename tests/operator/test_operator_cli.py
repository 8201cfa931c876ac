"""`longserve operator` argument handling and the handler helpers that need no cluster."""
import io
from contextlib import redirect_stderr

import kubernetes

from longserve.operator.handlers import connection_info, merge_patch
from longserve.server.cli import main


def run(*argv):
    err = io.StringIO()
    with redirect_stderr(err):
        rc = main(["operator", *argv])
    return rc, err.getvalue()


def test_scope_is_required():
    rc, err = run()
    assert rc == 2 and "--all-namespaces" in err


def test_missing_credentials_are_a_clear_error(tmp_path):
    rc, err = run("-A", "--kubeconfig", str(tmp_path / "nope"))
    assert rc == 2 and "no cluster credentials" in err


def test_bad_timer_interval():
    rc, err = run("-A", "--timer-interval", "0")
    assert rc == 2 and "timer-interval" in err


def test_merge_patch_removes_dropped_keys():
    old = {"plan": {"a": 1, "alternatives": [1]}, "phase": "Failed"}
    new = {"plan": {"a": 2}, "phase": "Failed", "endpoints": {"openai": "x"}}
    assert merge_patch(old, new) == {"plan": {"a": 2, "alternatives": None}, "endpoints": {"openai": "x"}}
    assert merge_patch(new, new) == {}


def test_connection_info_mirrors_the_client_configuration():
    cfg = kubernetes.client.Configuration(host="https://k8s.example:6443")
    cfg.api_key = {"BearerToken": "secret"}
    cfg.api_key_prefix = {"BearerToken": "Bearer"}
    cfg.verify_ssl = False
    info = connection_info(cfg)
    assert (info.server, info.scheme, info.token, info.insecure) == \
        ("https://k8s.example:6443", "Bearer", "secret", True)


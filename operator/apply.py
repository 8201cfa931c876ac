"""Server-side apply of the operator's children (field manager `longserve-operator`).

Why server-side apply and not JSON merge patches: a merge patch of the desired object can only add
or change fields, so a key the spec no longer produces (a nodeSelector entry, a label, a GPU
resource key) stayed on the child forever. With apply, the API server remembers which fields this
manager set (`metadata.managedFields`) and removes the ones a later apply leaves out, while fields
other managers own (a hand-added annotation, an admission webhook's defaults) are left alone.

Conflicts: when another manager changed a field we set (a `kubectl edit`, a `kubectl scale`), a
plain apply fails with 409. The operator owns its children's rendered fields, so it then applies
again with `force=true`, taking the fields back, and the caller records which fields and managers
were overridden (an event on the LongContextModel) — drift repair that says what it undid.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

FIELD_MANAGER = "longserve-operator"
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"      # JSON is YAML: the body is sent as JSON


@dataclass(frozen=True)
class Conflict:
    """An apply that had to be forced: which object, and the server's account of the conflicts."""
    kind: str
    name: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}: {self.message}"


def apply_body(obj: dict) -> dict:
    """The apply configuration: the rendered object without server-owned metadata."""
    body = json.loads(json.dumps(obj))
    meta = body.setdefault("metadata", {})
    for key in ("resourceVersion", "uid", "managedFields", "creationTimestamp", "generation"):
        meta.pop(key, None)
    body.pop("status", None)
    return body


def apply_query(force: bool) -> list[tuple[str, str]]:
    return [("fieldManager", FIELD_MANAGER), ("force", "true" if force else "false")]


def owned_by(live: dict, manager: str = FIELD_MANAGER) -> list[dict]:
    """The managedFields entries of `manager` on a live object (for tests and diagnostics)."""
    return [e for e in ((live.get("metadata") or {}).get("managedFields") or []) if e.get("manager") == manager]

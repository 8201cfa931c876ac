"""A Kubernetes API emulator for running the real kopf operator in tests (docs/testing.md#kmock).

KMock's `KubernetesEmulator` (pinned: kmock==0.8, this subclass overrides private behaviour) with
five fixes that kopf needs: the namespace comes from the URL on create; uid, creationTimestamp and
generation are filled in; every create and patch gets a new, increasing resourceVersion (and
generation grows when the spec changes); a failed JSON-patch `test` answers 422; lists return a
real resourceVersion and watches skip replayed objects at or below the requested one. The
emulator runs in its own thread and event loop and serves plain HTTP on 127.0.0.1.

Server-side apply (`application/apply-patch+yaml`) as the API server does it, in the parts the
operator relies on: `metadata.managedFields` per field manager and operation (FieldsV1), every
create and patch recorded as an Update by its manager (`fieldManager`, else the User-Agent's
product), a 409 for fields another manager set to a different value unless `force=true` (which
takes them over), and pruning of fields the applier owned before and no longer sends, unless
another manager owns them too. Lists are atomic here (the API server merges some lists by key,
e.g. containers by name; the operator always applies whole lists, so the difference never shows).
"""
from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import threading
import uuid

import jsonpatch
import jsonpointer
import kmock
from kmock._internal import enums

CORE_RESOURCES = {
    "v1/configmaps": "ConfigMap", "v1/services": "Service", "v1/persistentvolumeclaims": "PersistentVolumeClaim",
    "v1/events": "Event", "v1/pods": "Pod", "apps/v1/deployments": "Deployment", "batch/v1/jobs": "Job",
    "policy/v1/poddisruptionbudgets": "PodDisruptionBudget",
    "networking.k8s.io/v1/networkpolicies": "NetworkPolicy",
    "leaderworkerset.x-k8s.io/v1/leaderworkersets": "LeaderWorkerSet",
    "monitoring.coreos.com/v1/servicemonitors": "ServiceMonitor",
    "monitoring.coreos.com/v1/prometheusrules": "PrometheusRule",
    "autoscaling/v2/horizontalpodautoscalers": "HorizontalPodAutoscaler",
    "keda.sh/v1alpha1/scaledobjects": "ScaledObject",
}
VERBS = ["create", "delete", "get", "list", "patch", "watch"]
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"
SERVER_META = {"managedFields", "resourceVersion", "generation", "uid", "creationTimestamp", "namespace", "name",
               "deletionTimestamp"}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rv(obj) -> int:
    try:
        return int(((obj or {}).get("metadata") or {}).get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


class Emulator(kmock.KubernetesEmulator):
    """KubernetesEmulator with the five kopf compatibility fixes."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._versions = itertools.count(1)
        self.latest_version = 0

    def declare(self, path: str, kind: str, *, namespaced: bool = True, status: bool = False) -> None:
        self.resources[path] = kmock.ResourceInfo(kind=kind, singular=kind.lower(), namespaced=namespaced,
                                                  verbs=VERBS, subresources={"status", "scale"} if status else set())

    def _next_version(self) -> str:
        self.latest_version = next(self._versions)
        return str(self.latest_version)

    def _stored(self, request) -> dict | None:
        key = (request.resource, request.namespace, request.name)
        if key in self.objects and not self.objects[key].deleted:
            return copy.deepcopy(self.objects[key].raw)
        return None

    async def _handle(self, request):
        owned = False                        # managedFields already computed by server-side apply
        if request.resource is not None and request.action == enums.action.UPDATE and request.name and \
                request.headers.get("Content-Type", "").startswith(APPLY_CONTENT_TYPE):
            created, owned = self._server_side_apply(request), True
            if created is not None:                                   # apply of an absent object creates it
                await self._create_by_apply(request, created)
        if request.resource is not None and not owned and request.action in (enums.action.CREATE, enums.action.UPDATE):
            self._record_update(request)
        if request.resource is not None and request.action == enums.action.CREATE and isinstance(request.data, dict):
            self._fill_new(request)
        elif request.resource is not None and request.action == enums.action.UPDATE and request.name and \
                request.data != {}:
            current = self._stored(request)
            if current is not None:
                self._version_patch(request, current)
        return await super()._handle(request)

    def _fill_new(self, request) -> None:
        meta = request.data.setdefault("metadata", {})
        if request.namespace:                                        # fix 1
            meta["namespace"] = request.namespace
        meta.setdefault("uid", str(uuid.uuid4()))                    # fix 2
        meta.setdefault("creationTimestamp", _now())
        meta["generation"] = 1
        meta["resourceVersion"] = self._next_version()               # fix 3

    async def _create_by_apply(self, request, obj: dict) -> None:
        """Store the applied object as a create would; the PATCH itself then changes nothing."""
        meta = obj.setdefault("metadata", {})
        meta.update(namespace=request.namespace, uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1,
                    resourceVersion=self._next_version())
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key in self._objects and self._objects[key].deleted:
                self._objects[key].create(obj)
            elif key in self._objects:
                raise kmock.KubernetesError(status=409, reason="AlreadyExists", message="created meanwhile")
            else:
                self._objects[key] = obj
            await self._buses[request.resource].put({"type": "ADDED", "object": self._objects[key].raw})

    def _version_patch(self, request, current: dict) -> None:
        """Bump resourceVersion (and generation on spec changes); 422 for a failed `test` op."""
        version = self._next_version()
        generation = int(current.get("metadata", {}).get("generation") or 1)
        if isinstance(request.data, list):
            try:
                patched = jsonpatch.apply_patch(current, request.data)
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:   # fix 4
                raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from None
            if patched.get("spec") != current.get("spec") and request.subresource in (None, "scale"):
                generation += 1
            request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
            request.data.append({"op": "add", "path": "/metadata/generation", "value": generation})
        elif isinstance(request.data, dict):
            spec = request.data.get("spec")
            if spec is not None and request.subresource in (None, "scale") and \
                    _merged(current.get("spec"), spec) != current.get("spec"):
                generation += 1
            meta = request.data.get("metadata")
            if not isinstance(meta, dict):
                meta = request.data["metadata"] = {}
            meta["resourceVersion"] = version
            meta["generation"] = generation

    # --- server-side apply and field ownership ---
    def _server_side_apply(self, request) -> dict | None:
        """Rewrite an apply into a merge patch of the stored object; the object to create when there
        is none (the patch is then empty); 409 on conflicts."""
        manager = request.params.get("fieldManager")
        if not manager:
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="fieldManager is required for apply")
        if not isinstance(request.data, dict):
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="an apply body must be an object")
        force = request.params.get("force") == "true"
        current = self._stored(request)
        before = current or {}
        owners = _owners(before)
        applied = field_set(request.data)
        conflicts = []
        for (other, operation), paths in owners.items():
            if (other, operation) == (manager, "Apply"):
                continue
            clash = sorted(p for p in paths & applied if not isinstance(_at(request.data, p), dict)
                           and _at(before, p, _MISSING) != _at(request.data, p))
            conflicts += [(other, p) for p in clash]
            if force:
                owners[(other, operation)] = paths - applied
        if conflicts and not force:
            listed = "; ".join(f'conflict with "{m}": .{".".join(p)}' for m, p in conflicts)
            raise kmock.KubernetesError(status=409, reason="Conflict",
                                        message=f"Apply failed with {len(conflicts)} conflict(s): {listed}")
        previous = owners.get((manager, "Apply"), set())
        others = set().union(*(v for k, v in owners.items() if k != (manager, "Apply")))
        result = _merged(copy.deepcopy(before), request.data)
        for p in sorted(previous - applied, key=len, reverse=True):       # prune, deepest first
            if not any(o[:len(p)] == p for o in others):
                _remove(result, p)
        owners[(manager, "Apply")] = applied
        result.setdefault("metadata", {})["managedFields"] = _managed_fields(owners, result.get("apiVersion", ""))
        patch = {} if current is None else _merge_patch(current, result)
        request.data.clear()                 # the request is frozen; its body is rewritten in place
        request.data.update(patch)
        return result if current is None else None

    def _record_update(self, request) -> None:
        """Give the fields a create or non-apply patch changes to its manager (taken from others)."""
        if request.action == enums.action.UPDATE and not request.name:
            return
        before = (self._stored(request) or {}) if request.action == enums.action.UPDATE else {}
        try:
            if isinstance(request.data, list):
                after = jsonpatch.apply_patch(before, request.data)
            elif isinstance(request.data, dict):
                after = _merged(copy.deepcopy(before), request.data) if before else request.data
            else:
                return
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException):
            return                                                   # answered 422 later
        manager = request.params.get("fieldManager") or \
            (request.headers.get("User-Agent") or "unknown").split("/", 1)[0] or "unknown"
        old, new = field_set(before), field_set(after)
        changed = {p for p in new if p not in old or _at(before, p) != _at(after, p)}
        if not changed and old == new:
            return
        owners = {k: (v & new) - changed for k, v in _owners(before).items()}
        owners[(manager, "Update")] = owners.get((manager, "Update"), set()) | changed
        fields = _managed_fields(owners, after.get("apiVersion", ""))
        if isinstance(request.data, list):
            request.data.append({"op": "add", "path": "/metadata/managedFields", "value": fields})
        else:
            meta = request.data.get("metadata")
            if not isinstance(meta, dict):
                meta = request.data["metadata"] = {}
            meta["managedFields"] = fields

    async def _serve_list(self, request):                             # fix 5 (list)
        payload = await super()._serve_list(request)
        payload["metadata"] = {"resourceVersion": str(self.latest_version)}
        return payload

    async def _serve_watch(self, request):                            # fix 5 (watch)
        yield b""
        since = int(request.params.get("resourceVersion") or 0)
        async with self._lock:
            objs = [o for o in self._KubernetesEmulator__get_objs(request, strict=False) if not o.deleted]
            replay = [{"type": "ADDED", "object": o.raw} for o in objs if _rv(o.raw) > since]
            mark = await self._buses[request.resource].mark()
        for event in replay:
            yield event
        async for event in mark:
            meta = (event.get("object") or {}).get("metadata") or {}
            if (request.namespace is None or meta.get("namespace") == request.namespace) and \
                    (request.name is None or meta.get("name") == request.name):
                yield event


def _merged(base, patch):
    if not isinstance(base, dict) or not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merged(base.get(key), value)
    return out


def _merge_patch(old: dict, new: dict) -> dict:
    """A JSON merge patch turning `old` into `new` (None deletes)."""
    out = {k: None for k in old if k not in new}
    for key, value in new.items():
        if key not in old:
            out[key] = value
        elif old[key] != value:
            out[key] = _merge_patch(old[key], value) if isinstance(old[key], dict) and isinstance(value, dict) \
                else value
    return out


_MISSING = object()


def field_set(obj: dict) -> set[tuple]:
    """Every map key's path (maps are walked, lists and scalars are leaves); identity, status and
    server-written metadata are not fields anyone manages."""
    out = set()

    def walk(node: dict, prefix: tuple) -> None:
        for key, value in node.items():
            path = prefix + (key,)
            if path in (("apiVersion",), ("kind",), ("status",)) or (prefix == ("metadata",) and key in SERVER_META):
                continue
            out.add(path)
            if isinstance(value, dict):
                walk(value, path)
    walk(obj or {}, ())
    return out


def _at(obj, path: tuple, default=None):
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return default
        obj = obj[key]
    return obj


def _remove(obj: dict, path: tuple) -> None:
    parent = _at(obj, path[:-1])
    if isinstance(parent, dict):
        parent.pop(path[-1], None)


def _owners(obj: dict) -> dict[tuple[str, str], set]:
    out = {}
    for entry in ((obj.get("metadata") or {}).get("managedFields") or []):
        key = (entry.get("manager", ""), entry.get("operation", "Update"))
        out[key] = out.get(key, set()) | _from_fields_v1(entry.get("fieldsV1") or {})
    return out


def _from_fields_v1(node: dict, prefix: tuple = ()) -> set:
    out = set()
    for key, child in node.items():
        if key == ".":
            out.add(prefix)
            continue
        path = prefix + (key[2:],)
        out |= _from_fields_v1(child, path) if child else {path}
    return out


def _to_fields_v1(paths: set) -> dict:
    root: dict = {}
    for path in sorted(paths):
        node = root
        for key in path:
            node = node.setdefault(f"f:{key}", {})
    for path in paths:                       # an owned map that also has owned children: "." marks it
        node = root
        for key in path:
            node = node[f"f:{key}"]
        if node and "." not in node:
            node["."] = {}
    return root


def _managed_fields(owners: dict, api_version: str) -> list[dict]:
    return [{"manager": manager, "operation": operation, "apiVersion": api_version, "time": _now(),
             "fieldsType": "FieldsV1", "fieldsV1": _to_fields_v1(paths)}
            for (manager, operation), paths in sorted(owners.items()) if paths]


class EmulatorThread:
    """Runs an `Emulator` with an HTTP server in a background thread and event loop."""

    def __init__(self, custom_resources: dict[str, str]):
        self.custom_resources = custom_resources
        self.url: str | None = None
        self.emulator: Emulator | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kmock-emulator", daemon=True)

    def write_kubeconfig(self, path):
        """A kubeconfig at `path` that logs in to this emulator with a bearer token; returns `path`."""
        import yaml

        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": "test-token"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "test"}}]}))
        return path

    def __enter__(self) -> "EmulatorThread":
        self._thread.start()
        if not self._ready.wait(10) or self._error:
            raise RuntimeError(f"the API emulator did not start: {self._error!r}")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced to the test by __enter__
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with Emulator() as emulator, kmock.Server(emulator) as server:
            # kopf waits for the namespaces resource in discovery (it is never listed: scanning is off)
            emulator.declare("v1/namespaces", "Namespace", namespaced=False)
            # kopf peering (leader election among operator replicas)
            emulator.declare("kopf.dev/v1/clusterkopfpeerings", "ClusterKopfPeering", namespaced=False)
            emulator.declare("kopf.dev/v1/kopfpeerings", "KopfPeering")
            for path, kind in {**CORE_RESOURCES, **self.custom_resources}.items():
                emulator.declare(path, kind, status=path in self.custom_resources)
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def objects(self, path: str, namespace: str) -> dict[str, dict]:
        """Live objects of one resource in a namespace, by name (a snapshot for assertions)."""
        assert self.emulator is not None
        out = {}
        for (resource, ns, name), obj in list(self.emulator.objects.items()):
            if resource == kmock.resource(path) and ns == namespace and not obj.deleted:
                out[name] = copy.deepcopy(obj.raw)
        return out

"""A Kubernetes API emulator for running the real kopf operator in tests (testing.md §5).

KMock's `KubernetesEmulator` (pinned: kmock==0.8, this subclass overrides private behaviour) with
five fixes that kopf needs: the namespace comes from the URL on create; uid, creationTimestamp and
generation are filled in; every create and patch gets a new, increasing resourceVersion (and
generation grows when the spec changes); a failed JSON-patch `test` answers 422; lists return a
real resourceVersion and watches skip replayed objects at or below the requested one. The
emulator runs in its own thread and event loop and serves plain HTTP on 127.0.0.1.
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
}
VERBS = ["create", "delete", "get", "list", "patch", "watch"]


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
                                                  verbs=VERBS, subresources={"status"} if status else set())

    def _next_version(self) -> str:
        self.latest_version = next(self._versions)
        return str(self.latest_version)

    def _stored(self, request) -> dict | None:
        key = (request.resource, request.namespace, request.name)
        if key in self.objects and not self.objects[key].deleted:
            return copy.deepcopy(self.objects[key].raw)
        return None

    async def _handle(self, request):
        if request.resource is not None and request.action == enums.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if request.namespace:                                    # fix 1
                meta["namespace"] = request.namespace
            meta.setdefault("uid", str(uuid.uuid4()))                # fix 2
            meta.setdefault("creationTimestamp", _now())
            meta["generation"] = 1
            meta["resourceVersion"] = self._next_version()           # fix 3
        elif request.resource is not None and request.action == enums.action.UPDATE and request.name:
            current = self._stored(request)
            if current is not None:
                self._version_patch(request, current)
        return await super()._handle(request)

    def _version_patch(self, request, current: dict) -> None:
        """Bump resourceVersion (and generation on spec changes); 422 for a failed `test` op."""
        version = self._next_version()
        generation = int(current.get("metadata", {}).get("generation") or 1)
        if isinstance(request.data, list):
            try:
                patched = jsonpatch.apply_patch(current, request.data)
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:   # fix 4
                raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from None
            if patched.get("spec") != current.get("spec") and request.subresource is None:
                generation += 1
            request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
            request.data.append({"op": "add", "path": "/metadata/generation", "value": generation})
        elif isinstance(request.data, dict):
            spec = request.data.get("spec")
            if spec is not None and request.subresource is None and _merged(current.get("spec"), spec) != current.get("spec"):
                generation += 1
            meta = request.data.get("metadata")
            if not isinstance(meta, dict):
                meta = request.data["metadata"] = {}
            meta["resourceVersion"] = version
            meta["generation"] = generation

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
        return patch
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merged(base.get(key), value)
    return out


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

"""Fixtures for the operator's end-to-end tests: the KMock-based API emulator and the real kopf
operator, each in its own thread and event loop, talking HTTP; tests use the real kubernetes client."""
import asyncio
import importlib.util
import threading
import time
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("longserve_tests_kmock_emulator",
                                               Path(__file__).with_name("kmock_emulator.py"))
kmock_emulator = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kmock_emulator)

LCM_PATH = "longserve.io/v1alpha1/longcontextmodels"
TIMER_SECONDS = 0.3


class Cluster:
    """An emulated API server with the operator running against it."""

    def __init__(self, emulator, timer_interval: float):
        import kopf
        import kubernetes

        from longserve.operator import handlers, k8s_apply

        self.emulator = emulator
        configuration = kubernetes.client.Configuration(host=emulator.url)
        self.api = k8s_apply.Api(configuration, timeout=5)
        self.client = kubernetes.client.ApiClient(configuration)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)
        self.apps = kubernetes.client.AppsV1Api(self.client)
        registry = handlers.build_registry(timer_interval)

        @kopf.on.startup(registry=registry)
        def quiet(settings: kopf.OperatorSettings, **_):
            settings.posting.enabled = False
            settings.networking.error_backoffs = [0.1]
            settings.watching.reconnect_backoff = 0.05

        self._stop = threading.Event()
        self._ready = threading.Event()
        self._errors: list[BaseException] = []
        memo = handlers.make_memo(k8s_apply.Api(configuration, timeout=5))
        self._thread = threading.Thread(target=self._run, args=(registry, memo), name="kopf", daemon=True)

    def _run(self, registry, memo) -> None:
        import kopf
        try:
            asyncio.run(kopf.operator(registry=registry, memo=memo, clusterwide=True, standalone=True,
                                      stop_flag=self._stop, ready_flag=self._ready))
        except BaseException as exc:  # reported by stop()
            self._errors.append(exc)
            self._ready.set()

    def start(self) -> "Cluster":
        self._thread.start()
        assert self._ready.wait(10), "the operator did not start"
        assert not self._errors, self._errors
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.client.close()
        assert not self._thread.is_alive(), "the operator did not stop"
        assert not self._errors, self._errors

    # --- the LongContextModel, through the real kubernetes client ---
    def create(self, body: dict) -> dict:
        return self.custom.create_namespaced_custom_object("longserve.io", "v1alpha1", "default",
                                                           "longcontextmodels", body)

    def patch_spec(self, name: str, spec: dict) -> dict:
        return self.custom.patch_namespaced_custom_object("longserve.io", "v1alpha1", "default",
                                                          "longcontextmodels", name, {"spec": spec})

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object("longserve.io", "v1alpha1", "default", "longcontextmodels", name)

    def get(self, name: str) -> dict | None:
        return self.emulator.objects(LCM_PATH, "default").get(name)

    def children(self, path: str) -> dict[str, dict]:
        return self.emulator.objects(path, "default")

    def patch_status(self, api_version: str, plural: str, name: str, status: dict) -> None:
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        code, data = self.api.request("PATCH", f"{base}/namespaces/default/{plural}/{name}/status",
                                      {"status": status}, content_type="application/merge-patch+json")
        assert code == 200, data

    def wait(self, predicate, what: str, timeout: float = 8.0):
        """Poll until `predicate()` is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.02)


@pytest.fixture
def cluster():
    with kmock_emulator.EmulatorThread({LCM_PATH: "LongContextModel"}) as emulator:
        running = Cluster(emulator, TIMER_SECONDS).start()
        try:
            yield running
        finally:
            running.stop()


@pytest.fixture
def emulator():
    """Only the API emulator (for running `longserve operator` as a separate process)."""
    with kmock_emulator.EmulatorThread({LCM_PATH: "LongContextModel"}) as running:
        yield running

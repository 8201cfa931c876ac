"""The Kubernetes Pod Security Standards (`baseline` and `restricted`, policy version 1.30+) as a
checker for rendered objects, written from the published rules, field by field.

`violations(obj)` takes a Pod, or any object with a pod template (Deployment, Job, StatefulSet,
LeaderWorkerSet templates, ...) and returns one message per broken rule; an empty list means the
pod would be admitted in a namespace labelled `pod-security.kubernetes.io/enforce: restricted`.
`strict_groups` adds a check beyond the published profile: no root group (runAsGroup, fsGroup,
supplementalGroups 0), which our pods meet as well.

Why not a packaged checker: checkov's Kubernetes checks are a different catalogue (CIS-style, not
the two profiles), it pulls ~50 dependencies with pins that clash with ours, and it expects
network access for its default run; the rules below are short enough to keep exact.
"""
from __future__ import annotations

BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"


def pod_of(obj: dict) -> tuple[dict, dict]:
    """(metadata, spec) of the pod an object runs: a Pod itself, else the nearest pod template."""
    if obj.get("kind") == "Pod":
        return obj.get("metadata") or {}, obj.get("spec") or {}
    node = obj.get("spec") or {}
    while "template" not in node:
        nested = [v for k, v in node.items() if isinstance(v, dict) and k in ("jobTemplate", "spec",
                                                                              "leaderWorkerTemplate",
                                                                              "workerTemplate")]
        if not nested:
            raise ValueError(f"{obj.get('kind')} has no pod template")
        node = nested[0]
    template = node["template"]
    return template.get("metadata") or {}, template.get("spec") or {}


def _containers(spec: dict):
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(field) or []:
            yield f"{field}[{c.get('name')}]", c, c.get("securityContext") or {}


def baseline(meta: dict, spec: dict) -> list[str]:
    out = []
    psc = spec.get("securityContext") or {}
    contexts = [("pod", psc)] + [(where, sc) for where, _c, sc in _containers(spec)]
    # HostProcess
    for where, sc in contexts:
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"hostProcess: {where}.securityContext.windowsOptions.hostProcess must be unset or false")
    # Host namespaces
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            out.append(f"host namespaces: spec.{field} must be unset or false")
    for where, c, sc in _containers(spec):
        # Privileged containers
        if sc.get("privileged"):
            out.append(f"privileged: {where}.securityContext.privileged must be unset or false")
        # Capabilities (baseline list)
        added = set((sc.get("capabilities") or {}).get("add") or [])
        if added - BASELINE_CAPABILITIES:
            out.append(f"capabilities: {where} adds {sorted(added - BASELINE_CAPABILITIES)} beyond the baseline set")
        # Host ports
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"host ports: {where} port {port.get('name') or port.get('containerPort')} sets hostPort")
        # /proc mount
        if sc.get("procMount") not in (None, "Default"):
            out.append(f"procMount: {where}.securityContext.procMount must be unset or Default")
    # HostPath volumes
    for volume in spec.get("volumes") or []:
        if "hostPath" in volume:
            out.append(f"hostPath: volume {volume.get('name')} is a hostPath")
    # AppArmor (field and the older annotations)
    for where, sc in contexts:
        profile = (sc.get("appArmorProfile") or {}).get("type")
        if profile not in (None, "RuntimeDefault", "Localhost"):
            out.append(f"AppArmor: {where}.securityContext.appArmorProfile.type {profile!r} is not allowed")
    for key, value in (meta.get("annotations") or {}).items():
        if key.startswith(APPARMOR_ANNOTATION) and not (value == "runtime/default" or value.startswith("localhost/")):
            out.append(f"AppArmor: annotation {key}={value!r} is not allowed")
    # SELinux
    for where, sc in contexts:
        selinux = sc.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in SELINUX_TYPES:
            out.append(f"SELinux: {where} seLinuxOptions.type {selinux.get('type')!r} is not allowed")
        if selinux.get("user") or selinux.get("role"):
            out.append(f"SELinux: {where} must not set seLinuxOptions.user or role")
    # Seccomp (baseline: anything but Unconfined)
    for where, sc in contexts:
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            out.append(f"seccomp: {where}.securityContext.seccompProfile must not be Unconfined")
    # Sysctls
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            out.append(f"sysctls: {sysctl.get('name')} is not in the safe set")
    return out


def restricted(meta: dict, spec: dict, *, strict_groups: bool = False) -> list[str]:
    out = baseline(meta, spec)
    psc = spec.get("securityContext") or {}
    # Volume types
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume types: volume {volume.get('name')} is {sorted(kinds - RESTRICTED_VOLUMES)}")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    for where, _c, sc in _containers(spec):
        # Privilege escalation: must be explicitly false
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"privilege escalation: {where}.securityContext.allowPrivilegeEscalation must be false")
        # Running as non-root: true at container level, or inherited from the pod (not overridden to false)
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            out.append(f"non-root: {where} must run with runAsNonRoot: true (pod or container)")
        # Running as non-root user: no uid 0 anywhere
        if sc.get("runAsUser") == 0:
            out.append(f"non-root user: {where}.securityContext.runAsUser must not be 0")
        # Seccomp: RuntimeDefault or Localhost, at container level or inherited from the pod
        profile = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if profile not in ("RuntimeDefault", "Localhost"):
            out.append(f"seccomp: {where} needs seccompProfile RuntimeDefault or Localhost (pod or container)")
        # Capabilities: drop ALL, add at most NET_BIND_SERVICE
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"capabilities: {where} must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"capabilities: {where} may add only NET_BIND_SERVICE")
    if psc.get("runAsUser") == 0:
        out.append("non-root user: spec.securityContext.runAsUser must not be 0")
    if not any(True for _ in _containers(spec)):
        out.append("the pod has no containers")
    if strict_groups:
        groups = [("pod", psc.get("runAsGroup")), ("fsGroup", psc.get("fsGroup"))]
        groups += [(f"supplementalGroups[{i}]", g) for i, g in enumerate(psc.get("supplementalGroups") or [])]
        groups += [(where, sc.get("runAsGroup")) for where, _c, sc in _containers(spec)]
        out += [f"root group: {where} uses gid 0" for where, gid in groups if gid == 0]
    return out


def violations(obj: dict, *, strict_groups: bool = True) -> list[str]:
    """Every `restricted` (and so `baseline`) rule the object's pod breaks."""
    meta, spec = pod_of(obj)
    return restricted(meta, spec, strict_groups=strict_groups)

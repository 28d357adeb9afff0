#!/usr/bin/env python3
"""Validates k8s/: renders the kustomization, checks every object against the
Kubernetes schemas and the fleet's own rules, and the monitoring pieces
against the code. Run by scripts/validate-k8s.sh (which installs the tools).

What is checked, and how:
- Rendering: k8s/kustomization.yaml may only use `resources` and
  `configMapGenerator` (files, namespace, options.labels,
  options.disableNameSuffixHash); this script renders exactly that subset,
  and fails on anything else, so what it checks is what `kubectl apply -k`
  applies. Every top-level k8s/*.yaml must be listed.
- Built-in kinds: kubernetes-validate's strict JSON schemas (unknown fields
  are errors) for the oldest and newest Kubernetes versions we support.
- CRDs (ServiceMonitor, PrometheusRule from the Prometheus Operator) have no
  schema there: they are checked against the small JSON schemas below, which
  cover the fields we use and reject any others (a subset of the CRDs'
  openAPIV3Schema, written by hand from the operator's API reference).
- The Prometheus adapter rule (a plain ConfigMap holding YAML) is parsed and
  checked for the fields the adapter needs.
- Fleet rules: selectors match pods, Services/probes/ServiceMonitors name
  ports that exist, every SWITCHYARD_* key is a real variable of the binary
  that reads it (from edge/src/config.rs, router/src/config.rs) with a value
  of the right type, grace periods cover the drain, the NATS config passes
  `nats-server -t`, and so on (see the check_* functions).
- Metrics: every metric in alerts, dashboard and adapter rule is emitted by
  the code (switchyard_*: grepped from the metrics macros in edge/ and
  router/) or is on the list of exporter / kube-state-metrics / cAdvisor
  names below; label values used on our metrics occur in the source; every
  expression is valid PromQL (`promtool check rules`); the alerts' unit tests
  in k8s/tests/alerts.test.yaml pass (`promtool test rules`).
"""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import jsonschema
import kubernetes_validate
import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
K8S = os.path.join(ROOT, "k8s")
NAMESPACE = "switchyard"
# The oldest Kubernetes the manifests need (the preStop `sleep` action is 1.30) and the newest the schemas know.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
# Only the Prometheus adapter rule lives elsewhere, beside the adapter.
OTHER_NAMESPACES = {("ConfigMap", "prometheus-adapter-switchyard"): "monitoring"}
CLUSTER_SCOPED = {"Namespace"}
# Read by main.rs (tracing's EnvFilter), not by the clap config.
EXTRA_VARS = {"SWITCHYARD_LOG": "String"}
# Sidecars that need no probes of their own.
PROBE_EXEMPT_CONTAINERS = {"metrics"}

# Metrics that are not ours, by source. NATS: prometheus-nats-exporter
# (`-varz`: gnatsd_varz_<varz field>; `-jsz=all`: jetstream_server_*,
# jetstream_stream_*, jetstream_consumer_*). kube-state-metrics: kube_*.
# cAdvisor (kubelet): container_*.
EXTERNAL_METRICS = {
    "gnatsd_varz_connections", "gnatsd_varz_routes", "gnatsd_varz_slow_consumers",
    "gnatsd_varz_in_msgs", "gnatsd_varz_out_msgs", "gnatsd_varz_in_bytes", "gnatsd_varz_out_bytes",
    "gnatsd_varz_mem", "gnatsd_varz_cpu", "gnatsd_varz_subscriptions",
    "jetstream_server_total_streams", "jetstream_server_total_consumers",
    "jetstream_server_total_messages", "jetstream_server_total_message_bytes",
    "jetstream_server_max_storage", "jetstream_server_max_memory",
    "jetstream_stream_total_messages", "jetstream_stream_total_bytes",
    "jetstream_stream_first_seq", "jetstream_stream_last_seq", "jetstream_stream_consumer_count",
    "jetstream_consumer_num_pending", "jetstream_consumer_num_ack_pending",
    "jetstream_consumer_num_redelivered", "jetstream_consumer_num_waiting",
    "jetstream_consumer_delivered_stream_seq", "jetstream_consumer_ack_floor_stream_seq",
    "kube_horizontalpodautoscaler_status_current_replicas",
    "kube_horizontalpodautoscaler_status_desired_replicas",
    "kube_horizontalpodautoscaler_spec_max_replicas",
    "kube_horizontalpodautoscaler_spec_min_replicas",
    "kube_deployment_status_replicas_available",
    "container_cpu_usage_seconds_total", "container_memory_working_set_bytes",
}
METRIC_RE = re.compile(r"\b((?:switchyard|gnatsd|jetstream|kube|container)_[a-z0-9_]+)\b")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# --- schemas for the Prometheus Operator CRDs (the fields we use) -----------

META = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
LABEL_SELECTOR = {
    "type": "object",
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array"},
    },
    "additionalProperties": False,
}
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": META,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
                    "additionalProperties": False,
                },
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": DURATION,
                            "scrapeTimeout": DURATION,
                            "honorLabels": {"type": "boolean"},
                        },
                        "additionalProperties": False,
                    },
                },
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}
PROMETHEUS_RULE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": META,
        "spec": {
            "type": "object",
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": DURATION,
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    "properties": {
                                        "alert": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9]*$"},
                                        "record": {"type": "string"},
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": DURATION,
                                        "keep_firing_for": DURATION,
                                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                                    },
                                    "additionalProperties": False,
                                },
                            },
                        },
                        "additionalProperties": False,
                    },
                }
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
}
ADAPTER_RULES = {
    "type": "object",
    "required": ["rules"],
    "properties": {
        "rules": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["seriesQuery", "resources", "name", "metricsQuery"],
                "properties": {
                    "seriesQuery": {"type": "string"},
                    "seriesFilters": {"type": "array"},
                    "resources": {
                        "type": "object",
                        "properties": {
                            "overrides": {
                                "type": "object",
                                "additionalProperties": {
                                    "type": "object",
                                    "required": ["resource"],
                                    "properties": {"group": {"type": "string"}, "resource": {"type": "string"}},
                                    "additionalProperties": False,
                                },
                            },
                            "template": {"type": "string"},
                        },
                        "additionalProperties": False,
                    },
                    "name": {
                        "type": "object",
                        "required": ["matches"],
                        "properties": {"matches": {"type": "string"}, "as": {"type": "string"}},
                        "additionalProperties": False,
                    },
                    "metricsQuery": {"type": "string"},
                },
                "additionalProperties": False,
            },
        }
    },
    "additionalProperties": False,
}


class Checker:
    """Collects errors; every check adds to it instead of stopping."""

    def __init__(self):
        self.errors = []

    def error(self, where, msg):
        self.errors.append(f"{where}: {msg}")

    def expect(self, cond, where, msg):
        if not cond:
            self.error(where, msg)
        return cond


def where(obj):
    m = obj.get("metadata", {})
    return f"{obj.get('kind')}/{m.get('namespace', '-')}/{m.get('name')}"


# --- rendering --------------------------------------------------------------

def render(ck):
    kpath = os.path.join(K8S, "kustomization.yaml")
    with open(kpath) as f:
        kust = yaml.safe_load(f)
    allowed = {"apiVersion", "kind", "resources", "configMapGenerator"}
    extra = set(kust) - allowed
    ck.expect(not extra, "kustomization.yaml", f"fields this renderer does not implement: {sorted(extra)}")
    ck.expect(kust.get("kind") == "Kustomization", "kustomization.yaml", "kind must be Kustomization")
    objects = []
    listed = set()
    for res in kust.get("resources", []):
        path = os.path.join(K8S, res)
        listed.add(os.path.normpath(path))
        if not ck.expect(os.path.isfile(path) and res.endswith(".yaml"), "kustomization.yaml", f"resource {res} is not a YAML file here"):
            continue
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    doc["__file"] = res
                    objects.append(doc)
    for name in sorted(os.listdir(K8S)):
        path = os.path.join(K8S, name)
        if name.endswith(".yaml") and name != "kustomization.yaml" and os.path.isfile(path):
            ck.expect(os.path.normpath(path) in listed, "kustomization.yaml", f"k8s/{name} is not listed in resources")
    for gen in kust.get("configMapGenerator", []):
        extra = set(gen) - {"name", "namespace", "files", "options"}
        ck.expect(not extra, "kustomization.yaml", f"configMapGenerator fields not implemented: {sorted(extra)}")
        opts = gen.get("options", {})
        extra = set(opts) - {"labels", "disableNameSuffixHash"}
        ck.expect(not extra, "kustomization.yaml", f"generator options not implemented: {sorted(extra)}")
        ck.expect(opts.get("disableNameSuffixHash") is True, "kustomization.yaml",
                  "generated ConfigMaps must set disableNameSuffixHash (the renderer does not hash names)")
        data = {}
        for file in gen.get("files", []):
            key, _, src = file.partition("=") if "=" in file else (os.path.basename(file), "", file)
            with open(os.path.join(K8S, src)) as f:
                data[key] = f.read()
        meta = {"name": gen["name"]}
        if "namespace" in gen:
            meta["namespace"] = gen["namespace"]
        if opts.get("labels"):
            meta["labels"] = dict(opts["labels"])
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data,
                        "__file": "kustomization.yaml (configMapGenerator)"})
    return objects


# --- schemas ----------------------------------------------------------------

def check_schemas(ck, objects):
    for obj in objects:
        clean = {k: v for k, v in obj.items() if k != "__file"}
        crd = CRD_SCHEMAS.get((obj.get("apiVersion"), obj.get("kind")))
        if crd is not None:
            try:
                jsonschema.Draft202012Validator(crd).validate(clean)
            except jsonschema.ValidationError as e:
                path = ".".join(str(p) for p in e.absolute_path)
                ck.error(where(obj), f"does not match the {obj['kind']} schema at {path}: {e.message}")
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(clean, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                ck.error(where(obj), f"Kubernetes {version} schema (strict): {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                ck.error(where(obj), f"no schema: {e.message} (add a schema for it to scripts/validate_k8s.py)")
                break


# --- the binaries' variables ------------------------------------------------

def config_vars(path):
    """SWITCHYARD_* variables of one binary: name -> (rust type, allowed values or None)."""
    with open(os.path.join(ROOT, path)) as f:
        src = f.read()
    # Options flattened in from the runtime crate (NatsArgs) belong to every binary.
    if "switchyard_runtime::config::NatsArgs" in src:
        with open(os.path.join(ROOT, "runtime/src/config.rs")) as f:
            src += f.read()
    # The edge's permessage-deflate settings, flattened in from their own module.
    if "crate::deflate::DeflateSettings" in src:
        with open(os.path.join(ROOT, "edge/src/deflate/settings.rs")) as f:
            src += f.read()
    out = dict(EXTRA_VARS.items())
    out = {k: (v, None) for k, v in out.items()}
    # An attribute may span lines (rustfmt wraps long ones).
    for m in re.finditer(r"^\s*#\[arg\((.*?)\)\]\s*\n\s*pub \w+: ([^\n]+),\s*$", src, re.M | re.S):
        attrs = m.group(1)
        env = re.search(r'env = "(SWITCHYARD_[A-Z0-9_]+)"', attrs)
        if not env:
            continue
        choices = re.search(r"value_parser = \[([^\]]*)\]", attrs)
        allowed = re.findall(r'"([^"]*)"', choices.group(1)) if choices else None
        out[env.group(1)] = (m.group(2).strip(), allowed)
    return out


# clap ValueEnum types of the configs (lower-case variant names).
VALUE_ENUMS = {"Storage": ["file", "memory"], "LogFormat": ["text", "json"]}


def check_value(ck, loc, name, value, rust_type, allowed):
    t = rust_type.replace(" ", "")
    # Secret<T> parses like T; a Duration is a whole number in the unit its name says (_MS, _S).
    t = re.sub(r"Secret<(.*)>", r"\1", t)
    if t == "Duration":
        t = "u64"
    if allowed is None and t in VALUE_ENUMS:
        allowed = VALUE_ENUMS[t]
    if value == "" and name != "SWITCHYARD_JWT_SECRET":
        ck.error(loc, f"{name} is empty: clap takes an empty variable as the value \"\" (leave the key out instead)")
        return
    if allowed is not None:
        ck.expect(value in allowed, loc, f"{name}={value!r} is not one of {allowed}")
    elif t in ("u64", "usize", "u32", "u16", "u8"):
        ck.expect(re.fullmatch(r"[0-9]+", value) is not None, loc, f"{name}={value!r} is not an unsigned integer")
    elif t in ("i64", "i32"):
        ck.expect(re.fullmatch(r"-?[0-9]+", value) is not None, loc, f"{name}={value!r} is not an integer")
    elif t == "bool":
        ck.expect(value in ("true", "false"), loc, f"{name}={value!r} is not true or false")
    elif t == "SocketAddr":
        ck.expect(re.fullmatch(r"(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]):\d{1,5}", value) is not None, loc,
                  f"{name}={value!r} is not an IP:port (a SocketAddr takes no host names)")
    elif t not in ("String", "Option<String>", "Vec<String>", "Option<std::path::PathBuf>", "Option<PathBuf>"):
        ck.error(loc, f"{name} has a type this check does not know: {rust_type}")


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


# --- fleet rules ------------------------------------------------------------

def index(objects):
    by = {}
    for o in objects:
        m = o["metadata"]
        by[(o["kind"], m.get("namespace"), m["name"])] = o
    return by


def workloads(objects):
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def pod_labels(w):
    return w["spec"]["template"]["metadata"].get("labels", {})


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_ports(w):
    return {p["name"]: p["containerPort"] for c in w["spec"]["template"]["spec"]["containers"] for p in c.get("ports", []) if "name" in p}


def binary_of(container):
    cmd = (container.get("command") or [""])[0]
    for b in ("switchyard-edge", "switchyard-router"):
        if cmd.endswith("/" + b):
            return b
    return None


def check_objects(ck, objects):
    seen = set()
    for o in objects:
        m = o.get("metadata", {})
        key = (o.get("kind"), m.get("namespace"), m.get("name"))
        ck.expect(key not in seen, where(o), "defined twice")
        seen.add(key)
        want_ns = None if o["kind"] in CLUSTER_SCOPED else OTHER_NAMESPACES.get((o["kind"], m.get("name")), NAMESPACE)
        ck.expect(m.get("namespace") == want_ns, where(o), f"namespace should be {want_ns}")
        ck.expect(m.get("labels", {}).get("app.kubernetes.io/part-of") == "switchyard", where(o),
                  "missing label app.kubernetes.io/part-of: switchyard")


def check_workloads(ck, objects, by, vars_of):
    for w in workloads(objects):
        loc = where(w)
        spec = w["spec"]
        tmpl = spec["template"]
        pod = tmpl["spec"]
        labels = pod_labels(w)
        ns = w["metadata"]["namespace"]
        ck.expect(matches(spec["selector"].get("matchLabels"), labels), loc, "selector does not match the pod labels")
        psc = pod.get("securityContext", {})
        ck.expect(psc.get("runAsNonRoot") is True, loc, "pod must set runAsNonRoot: true")
        ck.expect(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", loc, "pod must use the RuntimeDefault seccomp profile")
        ck.expect(pod.get("automountServiceAccountToken") is False, loc, "pods here need no API token: automountServiceAccountToken: false")
        spreads = pod.get("topologySpreadConstraints", [])
        ck.expect(spreads, loc, "no topologySpreadConstraints")
        for s in spreads:
            ck.expect(matches(s.get("labelSelector", {}).get("matchLabels"), labels), loc,
                      f"topology spread on {s.get('topologyKey')} does not select this workload's pods")
        mounts_ok = {v["name"] for v in pod.get("volumes", [])} | {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
        for v in pod.get("volumes", []):
            if "configMap" in v:
                ck.expect(("ConfigMap", ns, v["configMap"]["name"]) in by, loc, f"volume {v['name']}: no ConfigMap {v['configMap']['name']}")
            if "secret" in v:
                ck.expect(("Secret", ns, v["secret"]["secretName"]) in by, loc, f"volume {v['name']}: no Secret {v['secret']['secretName']}")
        ports = container_ports(w)
        for c in pod["containers"]:
            cloc = f"{loc} container {c['name']}"
            image = c.get("image", "")
            ck.expect(re.search(r":[^/:]+$", image) and not image.endswith(":latest"), cloc, f"image {image!r} needs a pinned tag")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    ck.expect(r in res.get(kind, {}), cloc, f"resources.{kind}.{r} missing")
            sc = c.get("securityContext", {})
            ck.expect(sc.get("allowPrivilegeEscalation") is False, cloc, "allowPrivilegeEscalation must be false")
            ck.expect(sc.get("readOnlyRootFilesystem") is True, cloc, "readOnlyRootFilesystem must be true")
            ck.expect(sc.get("capabilities", {}).get("drop") == ["ALL"], cloc, "capabilities must drop ALL")
            for vm in c.get("volumeMounts", []):
                ck.expect(vm["name"] in mounts_ok, cloc, f"mounts unknown volume {vm['name']}")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                p = c.get(probe)
                if p and "httpGet" in p:
                    ck.expect(p["httpGet"]["port"] in ports, cloc, f"{probe} port {p['httpGet']['port']} is not a container port")
            if c["name"] not in PROBE_EXEMPT_CONTAINERS:
                ck.expect("readinessProbe" in c and "livenessProbe" in c, cloc, "needs readiness and liveness probes")
            for ref in c.get("envFrom", []):
                if "configMapRef" in ref:
                    ck.expect(("ConfigMap", ns, ref["configMapRef"]["name"]) in by, cloc, f"no ConfigMap {ref['configMapRef']['name']}")
                if "secretRef" in ref:
                    ck.expect(("Secret", ns, ref["secretRef"]["name"]) in by, cloc, f"no Secret {ref['secretRef']['name']}")
            binary = binary_of(c)
            if binary:
                check_switchyard_container(ck, cloc, w, c, binary, by, vars_of[binary])


def env_of(container, by, ns):
    """The container's environment from envFrom ConfigMaps/Secrets and env, with where each came from."""
    env = {}
    for ref in container.get("envFrom", []):
        if "configMapRef" in ref:
            cm = by.get(("ConfigMap", ns, ref["configMapRef"]["name"]), {})
            for k, v in cm.get("data", {}).items():
                env[k] = (str(v), where(cm))
        if "secretRef" in ref:
            s = by.get(("Secret", ns, ref["secretRef"]["name"]), {})
            for k, v in s.get("stringData", {}).items():
                env[k] = (str(v), where(s))
            for k in s.get("data", {}):
                env[k] = (None, where(s))
    for e in container.get("env", []):
        env[e["name"]] = (e.get("value"), "env")
    return env


def check_switchyard_container(ck, loc, w, c, binary, by, known):
    ns = w["metadata"]["namespace"]
    # The image is the Dockerfile's: binaries in /usr/local/bin, its non-root user.
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        dockerfile = f.read()
    ck.expect(c["command"][0] == f"/usr/local/bin/{binary}" and f"/out/{binary}" in dockerfile, loc,
              f"command must be /usr/local/bin/{binary}, which the Dockerfile installs")
    user = re.findall(r"^USER (\d+)", dockerfile, re.M)
    run_as = w["spec"]["template"]["spec"].get("securityContext", {}).get("runAsUser")
    ck.expect(user and int(user[-1]) == run_as, loc, f"runAsUser {run_as} is not the image's USER {user}")
    env = env_of(c, by, ns)
    for name, (value, src) in env.items():
        if not name.startswith("SWITCHYARD_"):
            continue
        if name not in known:
            ck.error(f"{src} (used by {binary})", f"{name} is not a {binary} variable")
            continue
        if value is not None:
            check_value(ck, f"{src} (used by {binary})", name, value, *known[name])
    ports = container_ports(w)
    admin = env.get("SWITCHYARD_ADMIN_LISTEN", (None,))[0]
    if ck.expect(admin is not None, loc, "SWITCHYARD_ADMIN_LISTEN must be set (the probes depend on it)"):
        ck.expect(ports.get("admin") == port_of(admin), loc, f"container port 'admin' is not the SWITCHYARD_ADMIN_LISTEN port {admin}")
    ck.expect(c.get("readinessProbe", {}).get("httpGet", {}) == {"path": "/readyz", "port": "admin"}, loc, "readinessProbe must be GET /readyz on port admin")
    ck.expect(c.get("livenessProbe", {}).get("httpGet", {}) == {"path": "/healthz", "port": "admin"}, loc, "livenessProbe must be GET /healthz on port admin")
    for name in ("SWITCHYARD_JWT_PUBLIC_KEY", "SWITCHYARD_JWKS", "SWITCHYARD_TLS_CERT", "SWITCHYARD_TLS_KEY"):
        path = env.get(name, (None,))[0]
        if path:
            mounted = any(path.startswith(vm["mountPath"].rstrip("/") + "/") for vm in c.get("volumeMounts", []))
            ck.expect(mounted, loc, f"{name}={path} is not under a mounted volume")
    if binary == "switchyard-edge":
        listen = env.get("SWITCHYARD_LISTEN", (None,))[0]
        if ck.expect(listen is not None, loc, "SWITCHYARD_LISTEN must be set"):
            ck.expect(ports.get("ws") == port_of(listen), loc, f"container port 'ws' is not the SWITCHYARD_LISTEN port {listen}")
        drain_ms = int(env.get("SWITCHYARD_DRAIN_TIMEOUT_MS", ("30000",))[0])
        spread_ms = int(env.get("SWITCHYARD_DRAIN_SPREAD_MS", ("10000",))[0])
        ck.expect(spread_ms < drain_ms, loc, "SWITCHYARD_DRAIN_SPREAD_MS must be below SWITCHYARD_DRAIN_TIMEOUT_MS (clients need time to leave)")
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        grace = w["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        # After the drain the process waits up to 5 s for its tasks (edge/src/lib.rs, RunningEdge::shutdown).
        needed = pre_stop + drain_ms / 1000 + 5
        ck.expect(grace > needed, loc, f"terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop} s + drain {drain_ms / 1000:g} s + 5 s = {needed:g} s")


def check_edge_router_agree(ck, by):
    edge = by.get(("ConfigMap", NAMESPACE, "switchyard-edge"), {}).get("data", {})
    router = by.get(("ConfigMap", NAMESPACE, "switchyard-router"), {}).get("data", {})
    for name in ("SWITCHYARD_NATS_URL", "SWITCHYARD_PREFIX", "SWITCHYARD_MAX_SUBSCRIPTIONS", "SWITCHYARD_USER_PARTITIONS"):
        ck.expect(edge.get(name) == router.get(name), "ConfigMaps switchyard-edge/switchyard-router",
                  f"{name} differs ({edge.get(name)!r} vs {router.get(name)!r}); edges and routers must agree")
    nats = by.get(("StatefulSet", NAMESPACE, "nats"))
    if nats and "SWITCHYARD_LOG_REPLICAS" in router:
        ck.expect(int(router["SWITCHYARD_LOG_REPLICAS"]) <= nats["spec"]["replicas"], "ConfigMap switchyard-router",
                  "SWITCHYARD_LOG_REPLICAS exceeds the NATS nodes")
    url = edge.get("SWITCHYARD_NATS_URL", "")
    for u in url.split(","):
        m = re.fullmatch(r"nats://([a-z0-9-]+)(\.[a-z0-9.-]+)?:(\d+)", u.strip())
        if ck.expect(m is not None, "ConfigMap switchyard-edge", f"SWITCHYARD_NATS_URL entry {u!r} is not nats://service:port"):
            svc = by.get(("Service", NAMESPACE, m.group(1)))
            if ck.expect(svc is not None, "ConfigMap switchyard-edge", f"SWITCHYARD_NATS_URL names no Service {m.group(1)}"):
                ck.expect(int(m.group(3)) in [p["port"] for p in svc["spec"]["ports"]], "ConfigMap switchyard-edge",
                          f"Service {m.group(1)} has no port {m.group(3)}")


def check_services(ck, objects, by):
    pods = workloads(objects)
    for s in [o for o in objects if o["kind"] == "Service"]:
        loc = where(s)
        sel = s["spec"].get("selector", {})
        targets = [w for w in pods if w["metadata"]["namespace"] == s["metadata"]["namespace"] and matches(sel, pod_labels(w))]
        if not ck.expect(targets, loc, f"selector {sel} matches no workload"):
            continue
        for p in s["spec"]["ports"]:
            tp = p.get("targetPort", p["port"])
            for w in targets:
                ports = container_ports(w)
                ok = tp in ports if isinstance(tp, str) else tp in ports.values()
                ck.expect(ok, loc, f"targetPort {tp} is not a port of {where(w)}")
    for i in [o for o in objects if o["kind"] == "Ingress"]:
        loc = where(i)
        for rule in i["spec"].get("rules", []):
            for path in rule.get("http", {}).get("paths", []):
                # The schemas carry no enums.
                ck.expect(path.get("pathType") in ("Exact", "Prefix", "ImplementationSpecific"), loc, f"pathType {path.get('pathType')!r}")
                b = path["backend"]["service"]
                svc = by.get(("Service", i["metadata"]["namespace"], b["name"]))
                if ck.expect(svc is not None, loc, f"backend Service {b['name']} missing"):
                    names = [p.get("name") for p in svc["spec"]["ports"]]
                    nums = [p["port"] for p in svc["spec"]["ports"]]
                    ck.expect(b["port"].get("name") in names or b["port"].get("number") in nums, loc, f"backend port {b['port']} not on Service {b['name']}")
        edge_cm = by.get(("ConfigMap", NAMESPACE, "switchyard-edge"), {}).get("data", {})
        heartbeat_s = int(edge_cm.get("SWITCHYARD_HEARTBEAT_MS", "25000")) / 1000
        ann = i["metadata"].get("annotations", {})
        for key in ("nginx.ingress.kubernetes.io/proxy-read-timeout", "nginx.ingress.kubernetes.io/proxy-send-timeout"):
            ck.expect(int(ann.get(key, "60")) >= 2 * heartbeat_s, loc,
                      f"{key} must be at least two heartbeats ({2 * heartbeat_s:g} s) or idle WebSockets are cut")


def check_autoscaling(ck, objects, by, adapter_names):
    for h in [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]:
        loc = where(h)
        ref = h["spec"]["scaleTargetRef"]
        target = by.get((ref["kind"], h["metadata"]["namespace"], ref["name"]))
        if ck.expect(target is not None, loc, f"scale target {ref['kind']}/{ref['name']} missing"):
            ck.expect("replicas" not in target["spec"], where(target),
                      "has spec.replicas although an HPA owns it (every apply would reset the scale)")
        ck.expect(h["spec"]["minReplicas"] <= h["spec"]["maxReplicas"], loc, "minReplicas > maxReplicas")
        kinds = {m["type"] for m in h["spec"]["metrics"]}
        ck.expect(any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in h["spec"]["metrics"]), loc, "no CPU metric")
        for m in h["spec"]["metrics"]:
            if m["type"] == "Pods":
                ck.expect(m["pods"]["metric"]["name"] in adapter_names, loc,
                          f"pods metric {m['pods']['metric']['name']} is not produced by the Prometheus adapter rule")
        if ref["name"] == "switchyard-edge":
            ck.expect("Pods" in kinds, loc, "the edge HPA must scale on connections per pod")
            down = h["spec"].get("behavior", {}).get("scaleDown", {})
            ck.expect(down.get("stabilizationWindowSeconds", 300) >= 600, loc,
                      "edge scale-down must wait at least 10 minutes (each removed pod makes its clients reconnect)")
            ck.expect(all(p["type"] == "Pods" and p["value"] <= 2 for p in down.get("policies", [])) and down.get("policies"), loc,
                      "edge scale-down must remove at most a pod or two per period")
    for p in [o for o in objects if o["kind"] == "PodDisruptionBudget"]:
        sel = p["spec"]["selector"].get("matchLabels")
        ck.expect(any(matches(sel, pod_labels(w)) for w in workloads(objects)), where(p), "selects no workload")
    for w in workloads(objects):
        ck.expect(any(matches(p["spec"]["selector"].get("matchLabels"), pod_labels(w)) for p in objects if p["kind"] == "PodDisruptionBudget"),
                  where(w), "no PodDisruptionBudget")


def check_nats(ck, by, nats_bin):
    sts = by.get(("StatefulSet", NAMESPACE, "nats"))
    cm = by.get(("ConfigMap", NAMESPACE, "nats-config"))
    if not (ck.expect(sts is not None, "nats", "StatefulSet nats missing") and ck.expect(cm is not None, "nats", "ConfigMap nats-config missing")):
        return
    conf = cm["data"]["nats.conf"]
    replicas = sts["spec"]["replicas"]
    svc = sts["spec"]["serviceName"]
    ck.expect(("Service", NAMESPACE, svc) in by and by[("Service", NAMESPACE, svc)]["spec"].get("clusterIP") == "None",
              where(sts), f"serviceName {svc} must be a headless Service")
    routes = re.findall(r"nats://([a-z0-9.-]+):(\d+)", conf.split("cluster", 1)[-1])
    want = {f"nats-{i}.{svc}.{NAMESPACE}.svc.cluster.local" for i in range(replicas)}
    ck.expect({h for h, _ in routes} == want, "nats.conf", f"cluster routes {sorted(h for h, _ in routes)} should be {sorted(want)}")
    c = next(c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "nats")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for key, name in (("listen", "client"), ("http", "monitor")):
        m = re.search(rf"^{key}:\s*[0-9.]+:(\d+)", conf, re.M)
        ck.expect(m and int(m.group(1)) == ports.get(name), "nats.conf", f"{key} port differs from container port {name}")
    m = re.search(r"cluster\s*\{[^}]*listen:\s*[0-9.]+:(\d+)", conf, re.S)
    ck.expect(m and int(m.group(1)) == ports.get("cluster"), "nats.conf", "cluster listen port differs from container port cluster")
    mounts = [vm["mountPath"] for vm in c.get("volumeMounts", [])]
    for key in ("store_dir", "pid_file"):
        m = re.search(rf"{key}:\s*(\S+)", conf)
        ck.expect(m and any(m.group(1).startswith(p) for p in mounts), "nats.conf", f"{key} is not on a mounted volume")
    m = re.search(r"lame_duck_duration:\s*(\d+)s", conf)
    g = re.search(r"lame_duck_grace_period:\s*(\d+)s", conf)
    grace = sts["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    if m and g:
        ck.expect(grace > int(m.group(1)) + int(g.group(1)), where(sts), "terminationGracePeriodSeconds must exceed the lame-duck duration + grace period")
    # The server's own parser, as each pod would run it.
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "nats.conf")
        with open(path, "w") as f:
            f.write(conf)
        r = subprocess.run([nats_bin, "-t", "-c", path], env={"SERVER_NAME": "nats-0"}, capture_output=True, text=True)
        ck.expect(r.returncode == 0, "nats.conf", f"nats-server -t refuses it: {(r.stdout + r.stderr).strip()}")


# --- monitoring -------------------------------------------------------------

def code_metrics():
    """Metric names and label values the code emits (edge/src, router/src)."""
    names, sources = set(), []
    for crate in ("edge/src", "router/src"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, crate)):
            for fn in files:
                if fn.endswith(".rs"):
                    with open(os.path.join(dirpath, fn)) as f:
                        src = f.read()
                    names.update(re.findall(r'metrics::(?:counter|gauge|histogram)!\(\s*"([a-z0-9_]+)"', src))
                    sources.append(src)
    return names, "\n".join(sources)


def check_metric_refs(ck, loc, expr, ours, strings):
    for name in set(METRIC_RE.findall(expr)):
        if name.startswith("switchyard_"):
            base = name
            for suffix in HISTOGRAM_SUFFIXES:
                if name.endswith(suffix) and name[: -len(suffix)] in ours:
                    base = name[: -len(suffix)]
            ck.expect(base in ours, loc, f"metric {name} is not emitted by edge/ or router/")
        else:
            ck.expect(name in EXTERNAL_METRICS, loc, f"metric {name} is neither ours nor on the known external list")
    # Label values on our own metrics must be ones the code uses.
    for sel in re.finditer(r"(switchyard_[a-z0-9_]+)\{([^}]*)\}", expr):
        for label, op, value in re.findall(r'(reason|op|result)\s*(=~|=)\s*"([^"]*)"', sel.group(2)):
            for v in value.split("|") if op == "=~" else [value]:
                ck.expect(f'"{v}"' in strings, loc, f'{sel.group(1)}{{{label}="{v}"}}: no such {label} in the code')


def check_monitoring(ck, objects, by, promtool):
    ours, strings = code_metrics()
    exprs = []  # (where, expr) for promtool
    # Alerts.
    ops_doc = open(os.path.join(ROOT, "docs", "OPERATIONS.md")).read() if os.path.exists(os.path.join(ROOT, "docs", "OPERATIONS.md")) else ""
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+\s+(.*)$", ops_doc, re.M)}
    rules_files = []
    for pr in [o for o in objects if o["kind"] == "PrometheusRule"]:
        rules_files.append({"groups": copy.deepcopy(pr["spec"]["groups"])})
        for g in pr["spec"]["groups"]:
            for r in g["rules"]:
                loc = f"{where(pr)} {r.get('alert') or r.get('record')}"
                check_metric_refs(ck, loc, r["expr"], ours, strings)
                if "alert" in r:
                    ck.expect(r.get("labels", {}).get("severity") in ("critical", "warning", "info"), loc, "severity label must be critical, warning or info")
                    ann = r.get("annotations", {})
                    ck.expect("summary" in ann, loc, "no summary annotation")
                    rb = ann.get("runbook", "")
                    m = re.fullmatch(r"docs/OPERATIONS\.md#([a-z0-9-]+)", rb)
                    if ck.expect(m is not None, loc, "runbook annotation must be docs/OPERATIONS.md#<anchor>"):
                        ck.expect(m.group(1) in anchors, loc, f"docs/OPERATIONS.md has no section #{m.group(1)}")
    # The adapter rule.
    adapter_names = set()
    cm = by.get(("ConfigMap", "monitoring", "prometheus-adapter-switchyard"))
    if ck.expect(cm is not None, "prometheus-adapter", "ConfigMap monitoring/prometheus-adapter-switchyard missing"):
        cfg = yaml.safe_load(cm["data"]["config.yaml"])
        try:
            jsonschema.Draft202012Validator(ADAPTER_RULES).validate(cfg)
        except jsonschema.ValidationError as e:
            ck.error(where(cm), f"adapter config: {e.message}")
            cfg = {"rules": []}
        for rule in cfg["rules"]:
            loc = f"{where(cm)} rule {rule['seriesQuery']}"
            check_metric_refs(ck, loc, rule["seriesQuery"], ours, strings)
            overrides = rule["resources"].get("overrides", {})
            ck.expect(overrides.get("namespace", {}).get("resource") == "namespace" and overrides.get("pod", {}).get("resource") == "pod",
                      loc, "a per-pod metric needs namespace and pod mapped to their resources")
            series = re.match(r"[a-z0-9_]+", rule["seriesQuery"]).group(0)
            ck.expect(re.search(rule["name"]["matches"], series) is not None, loc, "name.matches does not match the series")
            as_name = rule["name"].get("as")
            adapter_names.add(re.sub(rule["name"]["matches"], as_name.replace("${1}", r"\1"), series) if as_name else series)
            for t in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
                ck.expect(t in rule["metricsQuery"], loc, f"metricsQuery lacks {t}")
            q = (rule["metricsQuery"].replace("<<.Series>>", series)
                 .replace("<<.LabelMatchers>>", 'namespace="switchyard",pod=~"switchyard-edge-.*"')
                 .replace("<<.GroupBy>>", "namespace, pod"))
            exprs.append((loc, q))
    # The dashboard.
    dash_cm = by.get(("ConfigMap", NAMESPACE, "switchyard-dashboard"))
    if ck.expect(dash_cm is not None, "dashboard", "the dashboard ConfigMap is not generated"):
        for key, text in dash_cm["data"].items():
            loc = f"dashboard {key}"
            try:
                dash = json.loads(text)
            except json.JSONDecodeError as e:
                ck.error(loc, f"not valid JSON: {e}")
                continue
            ck.expect(dash.get("uid") and dash.get("title"), loc, "needs uid and title")
            ids = []
            for p in dash.get("panels", []):
                ids.append(p.get("id"))
                gp = p.get("gridPos", {})
                ck.expect(gp.get("x", 0) + gp.get("w", 0) <= 24, loc, f"panel {p.get('title')} is wider than the grid")
                if p.get("type") == "row":
                    continue
                ck.expect(p.get("datasource", {}).get("uid") == "${datasource}", loc, f"panel {p.get('title')} must use the $datasource variable")
                ck.expect(p.get("targets"), loc, f"panel {p.get('title')} has no queries")
                for t in p.get("targets", []):
                    e = t.get("expr", "")
                    ck.expect(e and t.get("refId"), loc, f"panel {p.get('title')}: a target without expr or refId")
                    check_metric_refs(ck, f"{loc} panel {p.get('title')!r}", e, ours, strings)
                    exprs.append((f"{loc} panel {p.get('title')!r}", e.replace("$__rate_interval", "5m").replace("$namespace", "switchyard")))
            ck.expect(len(ids) == len(set(ids)), loc, "panel ids are not unique")
            for v in dash.get("templating", {}).get("list", []):
                q = v.get("query")
                if isinstance(q, dict):
                    check_metric_refs(ck, f"{loc} variable {v['name']}", q.get("query", ""), ours, strings)
    # PromQL: promtool parses the alerts as they are and every other query as a recording rule.
    with tempfile.TemporaryDirectory() as d:
        files = []
        for i, rf in enumerate(rules_files):
            path = os.path.join(d, f"rules-{i}.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(rf, f)
            files.append(path)
        queries = {"groups": [{"name": "queries", "rules": [{"record": f"q:{i}", "expr": e} for i, (_, e) in enumerate(exprs)]}]}
        qpath = os.path.join(d, "queries.yaml")
        with open(qpath, "w") as f:
            yaml.safe_dump(queries, f)
        r = subprocess.run([promtool, "check", "rules", *files, qpath], capture_output=True, text=True)
        if r.returncode != 0:
            out = r.stdout + r.stderr
            for i, (loc, _) in enumerate(exprs):
                out = out.replace(f'"q:{i}"', f'"q:{i}" ({loc})')
            ck.error("promtool check rules", out.strip())
        # The alerts' unit tests, against the rules as the PrometheusRule holds them.
        tests = os.path.join(K8S, "tests", "alerts.test.yaml")
        if ck.expect(os.path.isfile(tests), "k8s/tests", "alerts.test.yaml missing") and files:
            with open(tests) as f:
                t = yaml.safe_load(f)
            t["rule_files"] = [os.path.basename(p) for p in files]
            tpath = os.path.join(d, "alerts.test.yaml")
            with open(tpath, "w") as f:
                yaml.safe_dump(t, f)
            r = subprocess.run([promtool, "test", "rules", tpath], capture_output=True, text=True, cwd=d)
            ck.expect(r.returncode == 0, "promtool test rules k8s/tests/alerts.test.yaml", (r.stdout + r.stderr).strip())
    return adapter_names, len(exprs)


def main():
    promtool, nats_bin = sys.argv[1], sys.argv[2]
    ck = Checker()
    objects = render(ck)
    by = index(objects)
    check_schemas(ck, objects)
    if ck.errors:
        # The rules below assume well-formed objects.
        return report(ck, objects, 0)
    check_objects(ck, objects)
    vars_of = {
        "switchyard-edge": config_vars("edge/src/config.rs"),
        "switchyard-router": config_vars("router/src/config.rs"),
    }
    for b, v in vars_of.items():
        ck.expect(len(v) >= 8, b, "could not read its variables from config.rs (did the clap attributes change shape?)")
    check_workloads(ck, objects, by, vars_of)
    check_edge_router_agree(ck, by)
    check_services(ck, objects, by)
    adapter_names, n_queries = check_monitoring(ck, objects, by, promtool)
    check_autoscaling(ck, objects, by, adapter_names)
    check_nats(ck, by, nats_bin)
    return report(ck, objects, n_queries)


def report(ck, objects, n_queries):
    kinds = sorted({o.get("kind", "?") for o in objects})
    if ck.errors:
        print(f"k8s: {len(ck.errors)} problem(s):", file=sys.stderr)
        for e in ck.errors:
            print(f"  - {e}", file=sys.stderr)
        return 1
    print(f"k8s: {len(objects)} objects ({', '.join(kinds)}) valid against Kubernetes "
          f"{' and '.join(v.rsplit('.', 1)[0] for v in K8S_VERSIONS)} (strict schemas) and the CRD schemas; "
          f"fleet rules hold; {n_queries} dashboard/adapter queries and all alerts parse; alert unit tests pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())

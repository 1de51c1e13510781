"""Deployment configs are valid against the real schemas, without a Kubernetes cluster.

- Every KubeRay manifest in cluster/kuberay/ (multi-document YAML) validates against the
  OpenAPI v3 schema of its kind from the KubeRay v1.7.0 CRDs in ../shared/kuberay-crds/.
  Object schemas that list their properties get additionalProperties: false unless they
  say x-kubernetes-preserve-unknown-fields: that is what the API server's strict field
  validation (kubectl's default, --validate=strict) does, so a misspelt field fails here
  as it would there. x-kubernetes-int-or-string without a type becomes integer|string.
  Other x-kubernetes-* keywords (list types, CEL rules) are unknown to jsonschema and
  ignored; the few operator-side rules segray's manifests could trip (names, TTL without
  shutdown, autoscaler v2 restart policy, clusterSelector, cron schedule) are checked
  explicitly, mirroring ray-operator/controllers/ray/utils/validation.go.
- Plain Kubernetes objects (CronJob, RBAC, ConfigMap, Namespace) are checked
  structurally; the RayJob inside the ConfigMap validates against the RayJob CRD.
- Every `python jobs/<x>.py <config>` named in a cluster YAML refers to files that exist.
- The cluster-launcher YAML validates against ray's own ray-schema.json and
  ray.autoscaler's validate_config after prepare_config (no cloud calls).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
CRD_DIR = REPO.parent / "shared" / "kuberay-crds" / "v1.7.0"
LAUNCHER = CLUSTER / "aws" / "segray-gpu.yaml"

EXPECTED_KINDS = {
    "raycluster.yaml": ["RayCluster"],
    "rayjob-train.yaml": ["RayJob"],
    "rayjob-infer.yaml": ["RayJob"],
    "raycronjob-nightly.yaml": ["RayCronJob"],
    "cronjob-nightly.yaml": ["Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"],
}
EXPECTED_ENTRYPOINTS = {
    "rayjob-train.yaml": "python jobs/train.py configs/demo_train.yaml",
    "rayjob-infer.yaml": "python jobs/infer.py configs/demo_infer.yaml",
    "raycronjob-nightly.yaml": "python jobs/nightly.py configs/nightly.yaml",
    "cronjob-nightly.yaml": "python jobs/nightly.py configs/nightly.yaml",
}
RAY_KINDS = {"RayCluster", "RayJob", "RayCronJob"}
# KubeRay: RayCluster names <= 53 (service suffixes), RayJob names <= 47 (cluster suffix),
# RayCronJob names + "-xxxxx" must be a valid RayJob name.
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 41}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
ENTRY_RE = re.compile(r"python3?\s+(jobs/[\w./-]+\.py)\s+(configs/[\w./-]+\.ya?ml)")


# ----------------------------------------------------------------------------- helpers
def _strict(node):
    """A copy of a CRD's OpenAPI v3 schema as the API server applies it (see module doc)."""
    if isinstance(node, list):
        return [_strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def _load_crds() -> dict[str, dict]:
    if not CRD_DIR.is_dir():
        pytest.fail(f"KubeRay CRDs not found at {CRD_DIR} (see ../shared/kuberay-crds/README.md)")
    crds = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        assert crd["kind"] == "CustomResourceDefinition", path
        crds[crd["spec"]["names"]["kind"]] = crd
    assert RAY_KINDS <= set(crds), sorted(crds)
    return crds


CRDS = _load_crds()


@functools.lru_cache(maxsize=None)
def _schema_for(kind: str, api_version: str) -> dict:
    crd = CRDS[kind]
    group = crd["spec"]["group"]
    for v in crd["spec"]["versions"]:
        if f"{group}/{v['name']}" == api_version:
            assert v["served"], f"{api_version} {kind} is not served"
            return _strict(v["schema"]["openAPIV3Schema"])
    raise AssertionError(f"{kind}: apiVersion {api_version} not in the CRD")


def _validate(obj: dict, schema: dict, where: str) -> None:
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        msg = "\n".join(f"  {'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in errors[:20])
        pytest.fail(f"{where}: {len(errors)} schema error(s):\n{msg}")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_docs() -> list[tuple[str, int, dict]]:
    out = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for i, doc in enumerate(_docs(path)):
            out.append((path.name, i, doc))
    return out


def _embedded_rayjobs() -> list[tuple[str, dict]]:
    """RayJobs kept as text in ConfigMaps (the plain-CronJob alternative)."""
    found = []
    for fname, i, doc in _all_docs():
        if doc.get("kind") == "ConfigMap":
            for key, text in (doc.get("data") or {}).items():
                sub = yaml.safe_load(text)
                if isinstance(sub, dict) and sub.get("kind") == "RayJob":
                    found.append((f"{fname}#{i} data.{key}", sub))
    return found


def _rayjob_specs() -> list[tuple[str, dict]]:
    specs = []
    for fname, i, doc in _all_docs():
        if doc.get("kind") == "RayJob":
            specs.append((f"{fname}#{i}", doc["spec"]))
        elif doc.get("kind") == "RayCronJob":
            specs.append((f"{fname}#{i} jobTemplate", doc["spec"]["jobTemplate"]))
    specs += [(w, d["spec"]) for w, d in _embedded_rayjobs()]
    return specs


def _cluster_specs() -> list[tuple[str, dict]]:
    out = [(f"{f}#{i}", d["spec"]) for f, i, d in _all_docs() if d.get("kind") == "RayCluster"]
    out += [(w, s["rayClusterSpec"]) for w, s in _rayjob_specs() if "rayClusterSpec" in s]
    return out


def _check_cron(expr: str) -> None:
    """A standard 5-field cron expression (what batch/v1 CronJob and robfig/cron accept)."""
    fields = expr.split()
    assert len(fields) == 5, f"cron {expr!r}: want 5 fields"
    ranges = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    names = [None, None, None,
             "jan feb mar apr may jun jul aug sep oct nov dec".split(),
             "sun mon tue wed thu fri sat".split()]
    for field, (lo, hi), nm in zip(fields, ranges, names):
        for part in field.split(","):
            base, _, step = part.partition("/")
            if step:
                assert step.isdigit() and int(step) > 0, f"cron {expr!r}: bad step {part!r}"
            if base in ("*", "?"):
                continue
            for bound in base.split("-"):
                if nm and bound.lower() in nm:
                    continue
                assert bound.isdigit() and lo <= int(bound) <= hi, f"cron {expr!r}: bad value {part!r}"
            assert len(base.split("-")) <= 2, f"cron {expr!r}: bad range {part!r}"


def _check_meta(doc: dict, where: str) -> None:
    assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], f"{where}: apiVersion"
    assert isinstance(doc.get("kind"), str) and doc["kind"], f"{where}: kind"
    meta = doc.get("metadata") or {}
    name = meta.get("name")
    gen = meta.get("generateName")
    assert name or gen, f"{where}: metadata.name (or generateName) required"
    kind = doc["kind"]
    if kind in RAY_KINDS:
        if name:
            assert DNS1035.match(name) and len(name) <= MAX_NAME[kind], f"{where}: bad {kind} name {name!r}"
        else:  # the API server appends 5 characters
            assert DNS1035.match(gen + "a") and len(gen) + 5 <= MAX_NAME[kind], f"{where}: bad generateName {gen!r}"
    else:
        assert DNS1123.match(name) and len(name) <= 253, f"{where}: bad name {name!r}"
    for key in ("labels", "annotations"):
        for k, v in (meta.get(key) or {}).items():
            assert isinstance(k, str) and isinstance(v, str), f"{where}: {key} must map strings to strings"


# ----------------------------------------------------------------------------- tests
def test_manifest_files_and_kinds():
    found = {p.name for p in KUBERAY.glob("*.yaml")}
    assert found == set(EXPECTED_KINDS), f"unexpected/missing manifests: {sorted(found ^ set(EXPECTED_KINDS))}"
    for fname, kinds in EXPECTED_KINDS.items():
        docs = _docs(KUBERAY / fname)
        assert [d.get("kind") for d in docs] == kinds, fname
        for i, d in enumerate(docs):
            _check_meta(d, f"{fname}#{i}")


@pytest.mark.parametrize("fname", sorted(EXPECTED_KINDS))
def test_kuberay_resources_validate_against_crd_schema(fname):
    n = 0
    for i, doc in enumerate(_docs(KUBERAY / fname)):
        if doc["kind"] in RAY_KINDS:
            _validate(doc, _schema_for(doc["kind"], doc["apiVersion"]), f"{fname}#{i} {doc['kind']}")
            n += 1
    for where, rayjob in _embedded_rayjobs():
        if where.startswith(fname):
            _check_meta(rayjob, where)
            _validate(rayjob, _schema_for("RayJob", rayjob["apiVersion"]), where)
            n += 1
    assert n >= 1, f"{fname}: no KubeRay resource found"


def test_strict_schema_catches_unknown_and_wrong_fields():
    """The validation above is not vacuous: a typo or a wrong type fails."""
    doc = _docs(KUBERAY / "rayjob-train.yaml")[0]
    schema = _schema_for("RayJob", doc["apiVersion"])
    bad = copy.deepcopy(doc)
    bad["spec"]["shutdownAfterJobFinish"] = True  # misspelt
    assert not jsonschema.Draft7Validator(schema).is_valid(bad)
    bad = copy.deepcopy(doc)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = "0"
    assert not jsonschema.Draft7Validator(schema).is_valid(bad)
    bad = copy.deepcopy(doc)
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "8 GB"
    assert not jsonschema.Draft7Validator(schema).is_valid(bad)


def test_rayjob_specs_follow_kuberay_rules():
    specs = _rayjob_specs()
    assert len(specs) == 4, [w for w, _ in specs]
    for where, spec in specs:
        entry = spec.get("entrypoint", "")
        assert ENTRY_RE.fullmatch(entry.strip()), f"{where}: entrypoint {entry!r}"
        assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode", where
        has_selector = bool(spec.get("clusterSelector"))
        assert has_selector != ("rayClusterSpec" in spec), f"{where}: exactly one of rayClusterSpec / clusterSelector"
        if has_selector:
            assert spec["clusterSelector"].get("ray.io/cluster"), f"{where}: clusterSelector needs ray.io/cluster"
            assert not spec.get("shutdownAfterJobFinishes"), where
        if spec.get("ttlSecondsAfterFinished", 0) > 0:
            assert spec.get("shutdownAfterJobFinishes") is True, f"{where}: TTL needs shutdownAfterJobFinishes"
        else:
            assert "rayClusterSpec" not in spec or spec.get("shutdownAfterJobFinishes"), where
        assert "deletionStrategy" not in spec and "managedBy" not in spec, f"{where}: CEL-checked fields unsupported here"
        if "activeDeadlineSeconds" in spec:
            assert spec["activeDeadlineSeconds"] > 0, where
        if "runtimeEnvYAML" in spec:
            env = yaml.safe_load(spec["runtimeEnvYAML"])
            assert isinstance(env, dict), f"{where}: runtimeEnvYAML must be a YAML mapping"
    train = _docs(KUBERAY / "rayjob-train.yaml")[0]["spec"]
    assert train["shutdownAfterJobFinishes"] is True and train["ttlSecondsAfterFinished"] > 0
    assert train["submissionMode"] == "K8sJobMode"


def test_expected_entrypoints():
    for fname, entry in EXPECTED_ENTRYPOINTS.items():
        text = (KUBERAY / fname).read_text()
        assert f"entrypoint: {entry}" in text, f"{fname}: want entrypoint {entry!r}"


def test_ray_cluster_specs_follow_kuberay_rules():
    specs = _cluster_specs()
    assert len(specs) == 5, [w for w, _ in specs]
    for where, spec in specs:
        head = spec["headGroupSpec"]
        head_c = head["template"]["spec"]["containers"]
        assert head_c, f"{where}: head needs a container"
        assert all(isinstance(v, str) for v in head["rayStartParams"].values()), f"{where}: rayStartParams are strings"
        assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0", where
        assert any(p.get("containerPort") == 8265 for p in head_c[0].get("ports", [])), f"{where}: dashboard port"
        assert "nvidia.com/gpu" not in head_c[0].get("resources", {}).get("limits", {}), f"{where}: CPU head"
        assert spec.get("enableInTreeAutoscaling") is True, where
        v2 = (spec.get("autoscalerOptions") or {}).get("version") == "v2"
        groups = spec["workerGroupSpecs"]
        assert groups, where
        for g in groups:
            gw = f"{where} group {g['groupName']}"
            assert 0 == g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], gw
            assert g["maxReplicas"] >= 1, gw
            c = g["template"]["spec"]["containers"]
            assert c, gw
            limits = c[0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1, f"{gw}: GPU worker needs nvidia.com/gpu limits"
            assert all(isinstance(v, str) for v in g.get("rayStartParams", {}).values()), gw
            if any(k in g.get("rayStartParams", {}) for k in ("num-cpus", "num-gpus", "memory", "resources")):
                assert not g.get("resources"), f"{gw}: resources both in rayStartParams and resources"
            if v2:
                assert g["template"]["spec"].get("restartPolicy", "Never") == "Never", gw
        if v2:
            assert head["template"]["spec"].get("restartPolicy", "Never") == "Never", where
            for c in head_c:
                assert "RAY_enable_autoscaler_v2" not in {e["name"] for e in c.get("env", [])}, where
        images = {c["image"] for c in head_c} | {
            c["image"] for g in groups for c in g["template"]["spec"]["containers"]
        }
        assert len(images) == 1, f"{where}: head and workers must run the same image: {images}"


def test_object_storage_credentials_come_from_secrets():
    """No inline AWS credentials anywhere; the Ray containers read them from a Secret."""
    for path in sorted(KUBERAY.glob("*.yaml")) + [LAUNCHER]:
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), path
    for where, spec in _cluster_specs():
        groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
        for g in groups:
            for c in g["template"]["spec"]["containers"]:
                env = {e["name"]: e for e in c.get("env", [])}
                for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    assert key in env, f"{where}: {c['name']} lacks {key}"
                for e in env.values():
                    if e["name"].startswith("AWS_"):
                        assert "value" not in e, f"{where}: {e['name']} inline"
                        assert "secretKeyRef" in e.get("valueFrom", {}), f"{where}: {e['name']} not from a Secret"


def test_worker_nodes_keep_the_workers_segray_needs():
    """Every node that runs segray's tasks and actors (CPUs > 0) gets segray.runtime.node_env's
    idle-worker limit for its CPU limit; the head (num-cpus 0) runs drivers only."""
    from segray.runtime import node_env

    for where, spec in _cluster_specs():
        for g in spec["workerGroupSpecs"]:
            for c in g["template"]["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                cpus = float(c["resources"]["limits"]["cpu"])
                assert env.get("RAY_num_workers_soft_limit") == node_env(cpus)["RAY_num_workers_soft_limit"], where
    launcher = LAUNCHER.read_text()
    assert launcher.count("RAY_num_workers_soft_limit=$((2 * $(nproc) + 4)) ray start") == 2


def test_raycronjob_schedule():
    doc = _docs(KUBERAY / "raycronjob-nightly.yaml")[0]
    assert doc["spec"]["schedule"] == "0 2 * * *"
    _check_cron(doc["spec"]["schedule"])
    text = (KUBERAY / "raycronjob-nightly.yaml").read_text()
    assert "feature gate" in text.lower() and "RayCronJob" in text


def test_plain_cronjob_alternative_is_consistent():
    docs = {d["kind"]: d for d in _docs(KUBERAY / "cronjob-nightly.yaml")}
    ns = docs["Namespace"]["metadata"]["name"]
    for kind in ("ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"):
        assert docs[kind]["metadata"].get("namespace") == ns, f"{kind} not in namespace {ns}"
    assert docs["Namespace"]["apiVersion"] == "v1" and docs["ServiceAccount"]["apiVersion"] == "v1"
    assert docs["ConfigMap"]["apiVersion"] == "v1"
    assert docs["Role"]["apiVersion"] == docs["RoleBinding"]["apiVersion"] == "rbac.authorization.k8s.io/v1"

    cron = docs["CronJob"]
    assert cron["apiVersion"] == "batch/v1"
    _check_cron(cron["spec"]["schedule"])
    assert cron["spec"]["schedule"] == "0 2 * * *"
    assert cron["spec"].get("concurrencyPolicy", "Allow") in ("Allow", "Forbid", "Replace")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure"), "Job pods cannot use restartPolicy Always"
    sa = docs["ServiceAccount"]["metadata"]["name"]
    assert pod["serviceAccountName"] == sa

    # The RoleBinding grants that ServiceAccount a Role that may create RayJobs.
    rb = docs["RoleBinding"]
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                             "name": docs["Role"]["metadata"]["name"]}
    assert {"kind": "ServiceAccount", "name": sa, "namespace": ns} in rb["subjects"]
    assert any(
        "ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and "create" in r["verbs"]
        for r in docs["Role"]["rules"]
    )

    # The container runs `kubectl create -f <file>` on a file that the ConfigMap volume holds.
    (container,) = pod["containers"]
    argv = container.get("command", []) + container.get("args", [])
    assert "kubectl" in " ".join(argv) and "create" in argv and "-f" in argv
    target = Path(argv[argv.index("-f") + 1])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    (vol_name,) = [n for n, p in mounts.items() if Path(p) == target.parent]
    assert vols[vol_name]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert target.name in docs["ConfigMap"]["data"]
    rayjob = yaml.safe_load(docs["ConfigMap"]["data"][target.name])
    assert rayjob["kind"] == "RayJob"
    # a fixed name would make the second night's `kubectl create` fail with AlreadyExists
    assert "generateName" in rayjob["metadata"] and "name" not in rayjob["metadata"]
    assert "namespace" not in rayjob["metadata"], "created in the CronJob pod's namespace"


def _entrypoint_refs() -> list[tuple[str, str, str]]:
    refs = []
    texts = [(p, p.read_text()) for p in sorted(CLUSTER.rglob("*.yaml"))]
    for path, text in texts:
        for m in ENTRY_RE.finditer(text):
            refs.append((str(path.relative_to(REPO)), m.group(1), m.group(2)))
    return refs


def test_entrypoints_refer_to_existing_jobs_and_configs():
    refs = _entrypoint_refs()
    assert len({(f, j, c) for f, j, c in refs if f.startswith("cluster/kuberay")}) >= 4, refs
    missing = sorted(
        {f"{path} -> {p}" for path, job, cfg in refs for p in (job, cfg) if not (REPO / p).is_file()}
    )
    assert not missing, "entrypoints name files that do not exist:\n  " + "\n  ".join(missing)


def test_dockerfile_matches_pins():
    text = (CLUSTER / "docker" / "Dockerfile").read_text()
    pins = dict(
        line.split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    m = re.search(r"^FROM rayproject/ray:([\d.]+)-py(\d)(\d+)-gpu\s*$", text, re.M)
    assert m, "Dockerfile must build FROM rayproject/ray:<ver>-py3XX-gpu"
    assert m.group(1) == pins["ray"], f"base image ray {m.group(1)} != pinned ray {pins['ray']}"
    assert "-c constraints.txt" in text
    for d in ("jobs", "configs", "segray"):
        assert re.search(rf"^COPY .*\b{d}\b", text, re.M), f"Dockerfile must copy {d}/"
    images = set(re.findall(r"image:\s*(\S+)", "".join(p.read_text() for p in KUBERAY.glob("ray*.yaml"))))
    assert images == {"localhost:5000/segray:0.1.0"}, images


# ----------------------------------------------------------------------------- launcher
def test_cluster_launcher_yaml_validates_against_ray_schema():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    config = yaml.safe_load(LAUNCHER.read_text())
    _validate(config, schema, LAUNCHER.name)

    prepared = prepare_config(copy.deepcopy(config))  # merges ray's aws defaults, offline
    validate_config(prepared)  # schema again + node types / max_workers consistency

    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "head is a CPU node"
    gpu_types = [t for n, t in types.items() if n != config["head_node_type"]]
    assert gpu_types and all(t["resources"].get("GPU", 0) >= 1 for t in gpu_types)
    for t in gpu_types:
        assert t["min_workers"] == 0 and t["max_workers"] >= 1
        assert t["node_config"]["InstanceType"].startswith(("g", "p"))
    assert config["idle_timeout_minutes"] > 0
    assert config["max_workers"] >= sum(t["max_workers"] for t in gpu_types)
    assert "." in config["file_mounts"].values(), "the repository is mounted on the nodes"
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "-c ~/segray/constraints.txt" in setup
    pins = (REPO / "constraints.txt").read_text()
    ray_pin = re.search(r"^ray==(\S+)$", pins, re.M).group(1)
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray_pin}-"), "image Ray == pinned ray"

    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_worker"]["min_worker"] = 0  # typo must be rejected
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)

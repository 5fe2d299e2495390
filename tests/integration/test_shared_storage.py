"""Beyond one machine, emulated on this one: a second Ray node and shared S3-compatible storage.

The steps are the README's "On a Ray cluster" ones:
  1. a second node joins the session's head: `ray start --address <head> --num-cpus 1
     --resources '{"node2": 1}' --temp-dir <own>` (with its own artifact cache, as a separate machine has);
  2. `jobs/train.py --storage-path s3://… --artifacts-dir s3://…`, its train worker placed on that node
     (Ray Train V2 refuses a local storage path once workers are on other nodes);
  3. the search app served from `s3://…/latest`, its InterestEncoder replica placed on that node, which
     downloads the version into its own cache;
  4. a query over HTTP; then that node alone is stopped (by the pid of its `ray start --block`).
The S3 server is moto's, a real HTTP S3 endpoint on loopback (conftest `s3_server`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from karma_ray.serve.harness import SEARCH_YAML, deploy_config, free_port, load_config

pytestmark = pytest.mark.integration
NODE_RESOURCE = "node2"


def join_command(head_address: str, temp_dir: str) -> list[str]:
    """The README's step for every node after the head (resources name it, so work can be placed there)."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    return [ray_cli, "start", "--address", head_address, "--num-cpus", "1",
            "--resources", json.dumps({NODE_RESOURCE: 1}), "--temp-dir", temp_dir, "--block", "--disable-usage-stats"]


@dataclass
class Node:
    proc: subprocess.Popen
    node_id: str
    cache: Path  # its KARMA_ARTIFACT_CACHE: what a separate machine's local disk would hold
    temp_dir: str

    def alive(self) -> bool:
        import ray

        return any(n["NodeID"] == self.node_id and n["Alive"] for n in ray.nodes())

    def stop(self) -> None:
        """SIGTERM to this node's `ray start --block` only: it drains and stops the processes it started."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only this node's processes
                self.proc.wait(timeout=30)


def start_node(head_address: str, root: Path, attempts: int = 2) -> Node:
    """Join a node (own temp dir, own artifact cache); a busy machine can time out its start: retried."""
    env = {**os.environ, "KARMA_ARTIFACT_CACHE": str(root / "artifact-cache"),
           "RAY_raylet_start_wait_time_s": "120"}  # the raylet's registration; 30 s is short on a busy box
    for attempt in range(attempts):
        temp_dir = tempfile.mkdtemp(prefix="kr-n2-")  # short: Ray's unix sockets live under it
        log = root / f"ray-start-{attempt}.log"
        proc = subprocess.Popen(join_command(head_address, temp_dir), env=env, stdout=open(log, "wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            import ray

            node = next((n for n in ray.nodes() if n["Alive"] and n["Resources"].get(NODE_RESOURCE)), None)
            if node is not None:
                return Node(proc, node["NodeID"], root / "artifact-cache", temp_dir)
            time.sleep(0.5)
        Node(proc, "", root, temp_dir).stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
    pytest.fail(f"the second node did not join:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def node2(ray_cluster, s3_server, tmp_path_factory):
    n = start_node(ray_cluster.get_runtime_context().gcs_address, tmp_path_factory.mktemp("node2"))
    try:
        yield n
    finally:
        n.stop()
        shutil.rmtree(n.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def s3_run(node2, s3_server, tiny_data):
    """jobs/train.py with shared storage, its one train worker on the second node: (run name, artifacts URI)."""
    from jobs.train import main

    name, artifacts = "s3-run", f"{s3_server}/artifacts"
    argv = ["--preset", "tiny", "--data", str(tiny_data), "--storage-path", f"{s3_server}/runs",
            "--artifacts-dir", artifacts, "--run-name", name, "--max-steps", "2", "--no-progress",
            "--set", "data.image_dim=8", "--set", "model.image_dim=8", "--set", "train.checkpoint_every=2",
            "--set", f"train.worker_resources={json.dumps({NODE_RESOURCE: 0.01})}"]
    assert main(argv) == 0
    return name, artifacts


@pytest.fixture(scope="module")
def served(s3_run, node2):
    """serve_configs/search.yaml on `s3://…/artifacts/latest`, the encoder replica on the second node."""
    from ray import serve

    cfg = load_config(SEARCH_YAML, artifact=f"{s3_run[1]}/latest", http_port=free_port(), overrides={
        "InterestEncoder": {"user_config": {"torch_threads": 1},
                            "ray_actor_options": {"resources": {NODE_RESOURCE: 0.01}}}})
    try:
        yield deploy_config(cfg, timeout_s=240)
    finally:
        serve.shutdown()


def s3_keys(prefix: str) -> list[str]:
    import boto3

    bucket, _, key = prefix.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    return [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/")
            for o in page.get("Contents", [])]


def test_s3_round_trip_train_export_serve_query(s3_run, served, s3_server):
    import httpx

    from karma_ray.artifact import storage

    name, artifacts = s3_run
    # checkpoints and the run's config went to the shared storage, not a local dir
    runs = s3_keys(f"{s3_server}/runs/{name}")
    assert any(k.endswith("/model.safetensors") and "/checkpoint_" in k for k in runs), runs
    assert f"runs/{name}/karma_config.json" in runs
    # one complete version under the prefix, then `latest` naming it
    version = s3_keys(storage.join(artifacts, name))
    manifest = json.loads(storage.read_text(f"{artifacts}/{name}/manifest.json"))
    assert sorted(version) == sorted(f"artifacts/{name}/{f}" for f in [*manifest["files"], "manifest.json"])
    assert f"artifacts/{name}/encoder/lm.safetensors" in version  # only trainable weights + the backbone's sha256
    assert storage.read_text(f"{artifacts}/latest").strip() == name
    assert manifest["checkpoint"].startswith(f"{s3_server}/runs/{name}/checkpoint_")

    with httpx.Client(base_url=served, timeout=60) as client:
        r = client.post("/search", json={"user_id": 1, "query": "running shoes", "history": [], "k": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["items"]) == 5 and body["model_version"] == name
        health = client.get("/healthz").json()
        assert health["model_version"] == name and health["artifact"] == f"{artifacts}/{name}"  # `latest` followed


def test_second_node_runs_a_train_worker_and_a_replica_then_stops_alone(s3_run, served, node2, ray_cluster,
                                                                        s3_server):
    from ray import serve

    from karma_ray.artifact import storage
    from karma_ray.serve.harness import replica_info

    name = s3_run[0]
    states = sorted(k for k in s3_keys(f"{s3_server}/runs/{name}") if k.endswith("/train_state.json"))
    # the train worker (rank 0) ran on the second node
    assert states and json.loads(storage.read_text(f"{s3_server}/{states[-1]}"))["node_id"] == node2.node_id
    (info,) = replica_info("InterestEncoder", tries=2)
    assert info["node_id"] == node2.node_id and info["node_id"] != ray_cluster.get_runtime_context().get_node_id()
    # that replica fetched the version into the second node's own cache, not the head's
    assert list(node2.cache.glob(f"karma-test/artifacts/{name}@*/encoder/lm.safetensors"))

    serve.shutdown()  # nothing left placed there; then only the second node goes away
    node2.stop()
    assert node2.proc.returncode is not None and not node2.alive()
    assert ray_cluster.is_initialized() and any(n["Alive"] for n in ray_cluster.nodes())

"""karma_ray.artifact.storage and the artifact layout on S3, against moto's S3 server on loopback (no Ray).

Bad input must fail with a message that names the fix: unknown scheme, missing or half-set credentials,
a missing bucket, an incomplete version, an existing version.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from karma_ray.artifact import layout, storage
from karma_ray.artifact.storage import StorageError


def test_unknown_scheme_and_missing_bucket_name_are_refused():
    with pytest.raises(StorageError, match=r"unsupported storage scheme 'gs://'.*s3://bucket/prefix"):
        storage.filesystem("gs://bucket/runs")
    with pytest.raises(StorageError, match="no bucket name"):
        storage.filesystem("s3:///runs")


def test_missing_or_half_set_credentials_are_named(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="half set.*only AWS_ACCESS_KEY_ID is set"):
        storage.filesystem("s3://karma-test/x")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(StorageError, match=r"no S3 credentials for the endpoint http://127\.0\.0\.1:\d+"):
        storage.filesystem("s3://karma-test/x")


def test_missing_bucket_is_named_with_the_endpoint(s3_server):
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket' does not exist at http://127\.0\.0\.1:\d+"):
        storage.filesystem("s3://no-such-bucket/artifacts")


def _write_version(root: str, name: str) -> str:
    """A version through layout.staged_dir (as the writer does): two files, then the manifest."""
    final = storage.join(root, name)
    with layout.staged_dir(final) as tmp:
        (tmp / "encoder").mkdir()
        (tmp / "encoder" / "lm.safetensors").write_bytes(b"weights")
        (tmp / "index.faiss").write_bytes(b"index")
        (tmp / layout.MANIFEST).write_text(json.dumps({"run_name": name, "files": ["encoder/lm.safetensors",
                                                                                  "index.faiss"]}))
    layout.point_latest(root, final)
    return final


def test_publish_locate_and_one_local_copy_per_version(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("KARMA_ARTIFACT_CACHE", str(tmp_path / "cache"))
    root = f"{s3_server}/unit-artifacts"
    v1 = _write_version(root, "v1")
    assert storage.read_text(f"{root}/latest") == "v1\n"
    assert layout.locate(f"{root}/latest", ("index.faiss",)) == v1 == layout.locate(v1 + "/")
    local = layout.resolve(f"{root}/latest", ("encoder/lm.safetensors", "index.faiss"))
    assert local.parent == tmp_path / "cache" / "karma-test" / "unit-artifacts" and local.name.startswith("v1@")
    assert (local / "encoder" / "lm.safetensors").read_bytes() == b"weights"
    assert layout.read_manifest(v1)["run_name"] == "v1" and layout.version(layout.read_manifest(v1), v1) == "v1"
    (local / "index.faiss").write_bytes(b"touched")  # a second resolve reuses the copy: no download
    assert layout.resolve(v1, ("index.faiss",)) == local and (local / "index.faiss").read_bytes() == b"touched"

    _write_version(root, "v2")
    assert layout.locate(f"{root}/latest") == f"{root}/v2"
    with pytest.raises(FileExistsError, match="immutable"):
        _write_version(root, "v1")
    with pytest.raises(FileNotFoundError, match="missing: rankers.json"):
        layout.locate(v1, ("rankers.json",))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        layout.locate(f"{root}/v9")


def test_a_version_without_its_manifest_is_incomplete(s3_server, tmp_path):
    """An upload that died before its last object (the manifest) is never served."""
    (tmp_path / "index.faiss").write_bytes(b"index")
    storage.upload_dir(tmp_path, f"{s3_server}/unit-partial/v1")
    with pytest.raises(FileNotFoundError, match="incomplete, missing: manifest.json"):
        layout.resolve(f"{s3_server}/unit-partial/v1", ("index.faiss",))


def test_local_paths_keep_their_meaning(tmp_path):
    root = tmp_path / "artifacts"
    v1 = _write_version(str(root), "v1")
    assert (root / "latest").is_symlink() and layout.locate(root / "latest") == str(Path(v1).resolve())
    assert layout.resolve(root / "latest", ("index.faiss",)) == Path(v1).resolve()
    assert layout.canonical(root / "latest") == str(Path(v1).resolve()) and layout.canonical("s3://b/a/") == "s3://b/a"


def test_a_rankers_version_of_an_s3_artifact_is_published_beside_it(s3_server, tmp_path):
    """train_rankers' new_version: the source's files plus the new ones, uploaded under the source's prefix."""
    from karma_ray.train.rankers import new_version

    src = tmp_path / "v1"
    src.mkdir()
    (src / "index.faiss").write_bytes(b"index")
    (src / layout.MANIFEST).write_text(json.dumps({"run_name": "v1", "files": ["index.faiss"]}))

    def write(d: Path) -> None:
        (d / "rankers.json").write_text("{}")
        (d / layout.MANIFEST).write_text(json.dumps({"run_name": "v1-rk", "files": ["index.faiss", "rankers.json"]}))

    out = new_version(src, "v1-rk", write, skip=(layout.MANIFEST,), parent=f"{s3_server}/unit-rankers")
    assert out == f"{s3_server}/unit-rankers/v1-rk"
    assert layout.locate(out, ("index.faiss", "rankers.json")) == out
    assert layout.read_manifest(out)["run_name"] == "v1-rk"

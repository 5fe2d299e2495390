"""Where runs and artifacts live: a local directory or an S3-compatible object store (torch-free).

A location is either a local path or an `s3://bucket/prefix` URI. S3 goes through `pyarrow.fs.S3FileSystem`
(the filesystem Ray Train itself uses), configured only from the standard environment, so the same
settings reach the driver, the train workers and the Serve replicas of every node:

  AWS_ENDPOINT_URL         an S3-compatible server (MinIO, Ceph, moto, …); unset = AWS itself
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (, AWS_SESSION_TOKEN)
                           credentials; with no endpoint set, the AWS chain also finds profiles and
                           instance roles
  AWS_REGION / AWS_DEFAULT_REGION

Nothing here caches credentials or passes them through Ray: each process reads its own environment.

A node reads an S3 artifact version from a local copy (`local_copy`): downloaded once per node into
`$KARMA_ARTIFACT_CACHE` (default `~/.cache/karma-ray/artifacts`), keyed by the version's URI, under a file
lock, so the replicas of one node share one download. Versions are immutable (see `layout`), so a
complete copy never goes stale.
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable
from urllib.parse import urlparse

SCHEMES = ("s3",)
CHUNK = 8 << 20


class StorageError(ValueError):
    """A storage location that cannot be used as given (scheme, credentials, bucket): the message says what to fix."""


def is_remote(location: str | Path) -> bool:
    return "://" in str(location)


def split(uri: str) -> tuple[str, str, str]:
    """`s3://bucket/a/b/` → ("s3", "bucket", "a/b"); refuses any other scheme and a missing bucket name."""
    parsed = urlparse(str(uri))
    if parsed.scheme not in SCHEMES:
        raise StorageError(f"{uri}: unsupported storage scheme {parsed.scheme + '://'!r}; use a local path or "
                           + " or ".join(f"{s}://bucket/prefix" for s in SCHEMES))
    if not parsed.netloc:
        raise StorageError(f"{uri}: no bucket name (expected s3://bucket/prefix)")
    return parsed.scheme, parsed.netloc, parsed.path.strip("/")


def join(base: str | Path, *parts: str) -> str:
    """A child location: URIs joined with '/', local paths with the OS's rules."""
    if not is_remote(base):
        return str(Path(base, *parts))
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def name(location: str | Path) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1] if is_remote(location) else Path(location).name


def parent(location: str | Path) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[0] if is_remote(location) else str(Path(location).parent)


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def _s3_options() -> dict[str, str]:
    """S3FileSystem keyword arguments from the environment (credentials are left to the AWS SDK's own chain)."""
    endpoint = _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    key, secret = _env("AWS_ACCESS_KEY_ID"), _env("AWS_SECRET_ACCESS_KEY")
    if bool(key) != bool(secret):
        raise StorageError("S3 credentials are half set: set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                           f"(only {'AWS_ACCESS_KEY_ID' if key else 'AWS_SECRET_ACCESS_KEY'} is set)")
    if endpoint and not key and not _env("AWS_PROFILE"):
        # an S3-compatible server has no instance role to fall back on: an unsigned request would only
        # come back later as an opaque "access denied"
        raise StorageError(f"no S3 credentials for the endpoint {endpoint} (AWS_ENDPOINT_URL): set "
                           "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment "
                           "of the driver and of every Ray node")
    opts = {}
    region = _env("AWS_REGION", "AWS_DEFAULT_REGION")
    if region:  # else the SDK's own default (config file, instance metadata)
        opts["region"] = region
    if endpoint:
        url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        if url.scheme not in ("http", "https") or not url.netloc:
            raise StorageError(f"AWS_ENDPOINT_URL={endpoint!r} is not an http(s)://host[:port] URL")
        opts.update(endpoint_override=url.netloc, scheme=url.scheme)
    return opts


@functools.lru_cache(maxsize=8)
def _s3(options: tuple[tuple[str, str], ...]):
    from pyarrow import fs

    return fs.S3FileSystem(**dict(options))


def filesystem(uri: str):
    """(pyarrow FileSystem, "bucket/key") for an s3:// URI, configured from the environment; the bucket must exist.

    Raises StorageError for an unknown scheme, missing credentials or a missing bucket.
    """
    _, bucket, key = split(uri)
    opts = tuple(sorted(_s3_options().items()))
    fs = _s3(opts)
    if not _bucket_ok(opts, bucket):
        _bucket_ok.cache_clear()  # it may be created later
        raise StorageError(f"bucket {bucket!r} does not exist at {_where(opts)}; create it first "
                           f"(e.g. `aws s3 mb s3://{bucket}`)")
    return fs, f"{bucket}/{key}".rstrip("/")


def _where(opts: tuple[tuple[str, str], ...]) -> str:
    o = dict(opts)
    return f"{o['scheme']}://{o['endpoint_override']}" if "endpoint_override" in o else f"AWS ({o.get('region', 'default region')})"


@functools.lru_cache(maxsize=32)
def _bucket_ok(opts: tuple[tuple[str, str], ...], bucket: str) -> bool:
    from pyarrow import fs as pafs

    try:
        return _s3(opts).get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError as e:  # unreachable endpoint, refused credentials, …: the SDK's message, with where
        raise StorageError(f"s3://{bucket} at {_where(opts)}: {e}") from e


def ray_storage(location: str) -> tuple[str, object | None]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: an absolute local path and None, or
    "bucket/prefix" on the environment-configured S3 filesystem (Ray would otherwise build its own from
    the URI, ignoring AWS_ENDPOINT_URL on some pyarrow versions)."""
    if not is_remote(location):
        return str(Path(location).expanduser().resolve()), None
    fs, path = filesystem(location)
    return path, fs


# ---- objects --------------------------------------------------------------------------------------
def file_type(location: str | Path) -> str:
    """"file", "dir" or "missing" (an S3 prefix that holds objects is a "dir")."""
    if not is_remote(location):
        p = Path(location)
        return "dir" if p.is_dir() else "file" if p.exists() else "missing"
    from pyarrow import fs as pafs

    fs, path = filesystem(str(location))
    t = fs.get_file_info(path).type
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(t, "missing")


def exists(location: str | Path) -> bool:
    return file_type(location) != "missing"


def read_bytes(location: str | Path) -> bytes:
    if not is_remote(location):
        return Path(location).read_bytes()
    fs, path = filesystem(str(location))
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{location} does not exist") from e


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode()


def write_text(location: str | Path, text: str) -> None:
    """One object (S3: a single PUT, so readers see the old or the new content) or a local file."""
    if not is_remote(location):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        Path(location).write_text(text)
        return
    fs, path = filesystem(str(location))
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def upload_dir(local: Path, uri: str, last: Iterable[str] = ()) -> None:
    """Copy every file under `local` to the prefix `uri`, the relative paths in `last` after all others
    (the manifest: a reader that finds it finds every file it lists). The prefix must be empty: versions
    are immutable."""
    fs, root = filesystem(uri)
    from pyarrow import fs as pafs

    if fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=False)):
        raise FileExistsError(f"{uri} already exists; artifact versions are immutable, write a new one")
    files = sorted(str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file())
    last = [f for f in last if f in files]
    for rel in [f for f in files if f not in last] + last:
        with open(Path(local) / rel, "rb") as src, fs.open_output_stream(f"{root}/{rel}") as dst:
            shutil.copyfileobj(src, dst, CHUNK)


def download(uri: str, dest: Path) -> None:
    fs, path = filesystem(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with fs.open_input_stream(path) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri} does not exist") from e


def cache_root() -> Path:
    return Path(os.environ.get("KARMA_ARTIFACT_CACHE") or "~/.cache/karma-ray/artifacts").expanduser()


def local_copy(uri: str, files: Iterable[str], tag: str) -> Path:
    """A complete local copy of the immutable prefix `uri` holding `files` (relative paths), downloaded once
    per node: into a hidden temporary directory, renamed into place when every file is there.

    `tag` (e.g. a hash of the version's manifest) is part of the cache key, so a prefix name reused by
    another store or another run never serves a stale copy.
    """
    _, bucket, key = split(uri)
    final = cache_root() / bucket / f"{key}@{tag}"
    if final.is_dir():
        return final
    from filelock import FileLock

    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if final.is_dir():  # another replica of this node finished it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            for rel in files:
                download(join(uri, rel), tmp / rel)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final

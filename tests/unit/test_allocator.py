"""The fast allocator: named for Ray workers and preloaded into scripts where the machine has it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from karma_ray.allocator import MALLOC_ENV, fast_allocator_env

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from karma_ray.allocator import allocator_in_use, reexec_with_fast_allocator
print("start", allocator_in_use(), flush=True)
if __name__ == "__main__":
    reexec_with_fast_allocator()
    print("main", allocator_in_use(), " ".join(sys.argv[1:]))
"""


def _run(tmp_path: Path, **env: str) -> list[str]:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(repo=str(REPO)))
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", MALLOC_ENV, "KARMA_MALLOC_REEXEC")}
    out = subprocess.run([sys.executable, str(script), "--flag", "a b"], env=clean | env, capture_output=True,
                         text=True, check=True)
    return out.stdout.splitlines()


def test_a_script_restarts_once_under_tcmalloc_where_installed_keeping_its_arguments(tmp_path):
    lines = _run(tmp_path)
    if fast_allocator_env():
        assert lines == ["start system", "start tcmalloc", "main tcmalloc --flag a b"]
    else:  # no tcmalloc on this machine: the script runs on, once, as it was started
        assert lines == ["start system", "main system --flag a b"]


def test_karma_malloc_system_turns_it_off_and_a_wrong_value_is_named(tmp_path, monkeypatch):
    assert _run(tmp_path, **{MALLOC_ENV: "system"}) == ["start system", "main system --flag a b"]
    monkeypatch.setenv(MALLOC_ENV, "system")
    assert fast_allocator_env() == {}
    monkeypatch.setenv(MALLOC_ENV, str(tmp_path / "libnothing.so"))
    with pytest.raises(ValueError, match="KARMA_MALLOC=.*libnothing.so.*tcmalloc, system or the path"):
        fast_allocator_env()

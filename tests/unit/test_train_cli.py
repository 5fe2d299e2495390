"""jobs/train.py's --data guard: an existing directory that is not a prepared dataset is refused
(preparing the preset's data into it would replace the files there)."""
from __future__ import annotations

import pytest

from jobs.train import main


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch):
    """main() turns library bars off for a non-terminal stderr (as here) through os.environ."""
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)


def test_a_split_prepared_directly_in_the_root_is_pointed_at_its_new_place(tmp_path, capsys):
    (tmp_path / "meta.json").write_text("{}")
    assert main(["--data", str(tmp_path), "--print-config"]) == 2
    assert f"move it to {tmp_path / 'cold'}" in capsys.readouterr().err


def test_resume_needs_a_run_that_exists(tmp_path, capsys):
    assert main(["--resume", "nope", "--storage-path", str(tmp_path)]) == 2
    assert "no run 'nope' to resume" in capsys.readouterr().err


def test_an_existing_unprepared_data_dir_is_refused(tmp_path, capsys):
    (tmp_path / "events.parquet").write_bytes(b"user data")
    assert main(["--data", str(tmp_path), "--print-config"]) == 2
    assert "holds no prepared `cold` split" in capsys.readouterr().err
    assert (tmp_path / "events.parquet").read_bytes() == b"user data"


def test_a_prepared_or_missing_data_dir_is_accepted(tmp_path, capsys):
    (tmp_path / "cold").mkdir()
    (tmp_path / "cold" / "meta.json").write_text("{}")  # the demo preset's protocol is `cold`
    assert main(["--data", str(tmp_path), "--print-config"]) == 0
    assert main(["--data", str(tmp_path / "not-yet"), "--print-config"]) == 0
    assert str(tmp_path) in capsys.readouterr().out


def test_demo_entry_point_imports_the_serve_tools_it_uses():
    """`make demo` is not run by the suite (it trains the real model); its imports and its closing
    lines are, so a moved helper cannot break it unnoticed."""
    import jobs.demo as demo

    assert callable(demo.deploy_config) and callable(demo.load_config) and callable(demo.free_port)
    lines = demo.next_steps().strip().splitlines()
    assert len(lines) == 4 and "serve run serve_configs/search.yaml" in lines[-1]

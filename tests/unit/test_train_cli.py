"""jobs/train.py's --data guard: an existing directory that is not a prepared dataset is refused
(preparing the preset's data into it would replace the files there)."""
from __future__ import annotations

import pytest

from jobs.train import main


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch):
    """main() turns library bars off for a non-terminal stderr (as here) through os.environ."""
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)


def test_an_existing_unprepared_data_dir_is_refused(tmp_path, capsys):
    (tmp_path / "events.parquet").write_bytes(b"user data")
    assert main(["--data", str(tmp_path), "--print-config"]) == 2
    assert "not a prepared dataset" in capsys.readouterr().err
    assert (tmp_path / "events.parquet").read_bytes() == b"user data"


def test_a_prepared_or_missing_data_dir_is_accepted(tmp_path, capsys):
    (tmp_path / "meta.json").write_text("{}")
    assert main(["--data", str(tmp_path), "--print-config"]) == 0
    assert main(["--data", str(tmp_path / "not-yet"), "--print-config"]) == 0
    assert str(tmp_path) in capsys.readouterr().out

"""The Ray Data tokeniser class, called directly: bad rows are reported with counts and examples."""
from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq

from karma_ray.config import get_preset
from karma_ray.data.pipeline import TokenizeEvents
from karma_ray.data.prepare import prepare_dataset
from karma_ray.data.schema import EVENTS_SCHEMA


def test_tokenizer_rejects_bad_rows_with_count_and_examples(tmp_path, caplog):
    prepare_dataset("synthetic", tmp_path / "cold", n_items=150, n_users=40, seed=1)
    cfg = get_preset("tiny").with_overrides([f"data.path={tmp_path}"])
    good = pq.read_table(tmp_path / "cold" / "valid.parquet").slice(0, 4)
    bad = pa.table({"user_id": [1, None], "ts": [1, 2], "query": ["", ""], "history": [[999999], [1]],
                    "target": [1, 2], "negatives": [[], []]}, schema=EVENTS_SCHEMA)
    tokenize = TokenizeEvents(cfg.to_dict(), str(tmp_path / "cold"))
    with caplog.at_level(logging.WARNING):
        out = tokenize(pa.concat_tables([good, bad]))
    assert out["int_ids"].shape[0] == 4  # the 4 valid rows went on
    assert tokenize.rejects.rejected == 2
    assert set(tokenize.rejects.reasons) == {"unknown_history_item", "null_user_id"}
    assert "rejected 2 of 6 rows" in caplog.text
    assert out["int_ids"].shape[1] == cfg.data.max_prompt_tokens + 1 + cfg.data.max_target_tokens

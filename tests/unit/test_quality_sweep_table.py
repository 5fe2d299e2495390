"""benchmarks/quality.py folds every `quality_sweep_*.json` into quality.md as one table."""
from __future__ import annotations

import json

from benchmarks.quality import sweep_table


def _metrics(hr50: float, cold50: float, train_s: float | None = None) -> dict:
    split = lambda hr: {"hr@10": hr / 4, "hr@50": hr, "hr@200": 2 * hr, "ndcg@10": hr / 8,  # noqa: E731
                        "hr@50_ci95": [hr - 0.01, hr + 0.01]}
    m = {"splits": {"test": split(hr50), "test_cold": split(cold50)},
         "attention": {"sink_rate": 1.0, "int_attn_entropy": 0.5, "int_attn_top1": 0.3},
         "fidelity": {"fidelity_f1": 0.2}, "effective_rank": 4.0}
    return m | ({"train_seconds": train_s} if train_s else {})


def test_sweep_rows_name_the_changed_settings_and_every_seed(tmp_path):
    base = {"budget": {"lr": 1e-4, "init_temperature": 0.05, "seeds": [0, 1], "arm_seconds": {}},
            "details": {"action_only": {"0": _metrics(0.09, 0.05, 400.0)}, "karma": {"0": _metrics(0.07, 0.04)}}}
    sweep = {"budget": {"lr": 1e-4, "init_temperature": 0.1, "seeds": [1], "arm_seconds": {"karma": 9}},
             "details": {"karma": {"1": _metrics(0.088, 0.052, 870.0)}}}
    (tmp_path / "quality_sweep_tau0.1.json").write_text(json.dumps(sweep))

    rows = [r for r in sweep_table(tmp_path, base).splitlines() if r.startswith("| ")][1:]  # after the header

    assert rows[0].startswith("| committed run | – | action_only (seed 0) | 0.0225 | 0.0900 [0.080, 0.100]")
    assert rows[1].endswith("| – |")  # no train_seconds recorded
    assert rows[2].startswith("| tau0.1 | init_temperature=0.1 | karma (seed 1) | 0.0220 | 0.0880 [0.078, 0.098] | "
                              "0.0520 [0.042, 0.062] | 1.0 | 0.500 | 0.200 | 4.00 | 870.0 |")
    assert len(rows) == 3


def test_no_sweep_files_adds_nothing(tmp_path):
    assert sweep_table(tmp_path, {"budget": {}, "details": {}}) == ""

"""The coefficient table of the generated study markdown, from a hand-made summary."""

from __future__ import annotations

from experiments.tables import coefficient_rows


def test_coefficient_rows_average_thirds_of_training():
    steps = list(range(0, 90, 10))  # 9 logged steps: 3 per third
    k = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    entries = {"mlb": {"runs": ["a", "b"], "traces": {
        "k": {"visual": {"steps": steps, "mean": k}},
        "r": {"visual": {"steps": [], "mean": []}},  # no trace: no row
        "s": {"visual": {"steps": steps, "mean": k}},  # a score, not a coefficient: no row
    }}, "joint": {"runs": ["c"], "traces": {}}}
    rows = coefficient_rows(entries)
    assert rows == [["mlb", "k_visual", "2.00", "5.00", "8.00", "9.00", "2"]]

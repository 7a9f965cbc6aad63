"""Metrics against values computed by hand."""

import numpy as np
import pytest

from trainer.metrics import agreement, confusion, ece, macro_f1, summarize


def test_confusion_and_macro_f1():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 1, 2, 0])
    conf = confusion(labels, preds, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # class 0: p 1/2 r 1/2 f 1/2; class 1: p 2/3 r 1 f 0.8; class 2: p 1 r 1/2 f 2/3
    assert macro_f1(conf) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_ece_of_perfectly_calibrated_and_overconfident_predictions():
    labels = np.array([0, 1, 0, 1])
    sure = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert ece(sure, labels)[0] == pytest.approx(0.0)
    wrong = np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])  # conf 0.9, accuracy 0.5
    value, bins = ece(wrong, labels, bins=15)
    assert value == pytest.approx(0.4)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 4


def test_agreement_table():
    labels = np.array([0, 1, 2, 3, 4])
    audio = np.array([0, 1, 0, 0, 4])
    video = np.array([0, 0, 2, 0, 0])
    fused = np.array([0, 1, 0, 3, 4])
    table = agreement(labels, fused, audio, video, ("audio", "video"))
    assert {k: v["count"] for k, v in table.items()} == {"both_right": 1, "only_audio": 2, "only_video": 1, "both_wrong": 1}
    assert table["only_video"]["fused_accuracy"] == 0.0 and table["both_wrong"]["fused_accuracy"] == 1.0


def test_summarize_keys_and_unimodal_accuracy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 50)
    fused = rng.normal(size=(50, 6))
    uni = {"audio": np.eye(6)[labels] * 5, "visual": rng.normal(size=(50, 6))}
    out = summarize(labels, fused, uni, 6)
    assert out["unimodal_accuracy"]["audio"] == 1.0
    assert out["samples"] == 50 and len(out["confusion"]) == 6
    assert set(out["agreement"]) == {"both_right", "only_audio", "only_visual", "both_wrong"}


def test_share_accuracy_only_for_decomposable_heads():
    labels = np.array([0, 1, 2, 0])
    fused = np.eye(3)[[0, 1, 2, 0]]
    shares = {"audio": np.eye(3)[[0, 1, 1, 1]], "visual": np.eye(3)[[2, 2, 2, 0]]}
    out = summarize(labels, fused, {"audio": fused, "visual": fused}, 3, share_logits=shares)
    assert out["share_accuracy"] == {"audio": 0.5, "visual": 0.5}
    assert "share_accuracy" not in summarize(labels, fused, {"audio": fused, "visual": fused}, 3)


def test_drop_records_after_forgets_the_killed_epoch(tmp_path):
    import json

    from trainer.run_log import drop_records_after

    path = tmp_path / "metrics.jsonl"
    records = [{"kind": "train", "epoch": 0, "step": 1}, {"kind": "val", "epoch": 0, "step": 2},
               {"kind": "train", "epoch": 1, "step": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tra')  # cut by the kill
    drop_records_after(str(path), step=2, epoch=1)
    assert [json.loads(x) for x in path.read_text().splitlines()] == records[:2]

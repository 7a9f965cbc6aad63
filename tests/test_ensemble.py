"""The unimodal ensemble (experiments/ensemble.py) on planted logits, and its rows in the study."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from experiments import tables
from experiments.collect import Run
from experiments.ensemble import aligned, ensemble_scores
from experiments.study import setting_study
from trainer.predictions import ids_to_tensor, load_predictions, save_predictions, tensor_to_ids

# Three classes, four clips. Audio is sure and right on a, b; visual is sure and right on c;
# on d both are unsure and wrong alone, but their averaged softmax is right.
IDS = ["a", "b", "c", "d"]
LABELS = np.array([0, 1, 2, 2])
AUDIO = np.log(np.array([[0.90, 0.05, 0.05], [0.05, 0.90, 0.05], [0.60, 0.30, 0.10], [0.45, 0.10, 0.45 - 1e-3]]))
VISUAL = np.log(np.array([[0.30, 0.60, 0.10], [0.10, 0.30, 0.60], [0.05, 0.05, 0.90], [0.10, 0.45, 0.45 - 1e-3]]))
# By hand: audio right on a, b (2/4); visual right on c (1/4); mean softmax on d is
# (0.275, 0.275, 0.449) -> class 2, right; on a (0.6, .325, .075) right; b (.075, .6, .325)
# right; c (.325, .175, .5) right: the ensemble gets 4/4, the oracle 3/4.


def member(ids, labels, logits, order):
    return {"clip_id": np.array([ids[i] for i in order]), "label": labels[order], "logits": logits[order]}


def test_ensemble_on_planted_logits_in_different_clip_orders():
    audio = member(IDS, LABELS, AUDIO, [0, 1, 2, 3])
    visual = member(IDS, LABELS, VISUAL, [3, 1, 0, 2])  # another order: members are aligned by clip id
    scores = ensemble_scores([audio, visual])
    assert scores == {"accuracy": 1.0, "oracle": 0.75, "n": 4}
    # Each member alone equals its own accuracy.
    assert ensemble_scores([audio])["accuracy"] == 0.5 and ensemble_scores([visual])["accuracy"] == 0.25


def test_only_clips_every_member_has_count_and_labels_must_agree():
    audio = member(IDS, LABELS, AUDIO, [0, 1, 2, 3])
    visual = member(IDS, LABELS, VISUAL, [3, 2])  # c and d only
    labels, logits = aligned([audio, visual])
    assert labels.tolist() == [2, 2] and np.allclose(logits[0], AUDIO[[2, 3]])
    assert ensemble_scores([audio, visual]) == {"accuracy": 1.0, "oracle": 0.5, "n": 2}  # d: neither alone
    wrong = member(IDS, np.array([0, 1, 2, 0]), VISUAL, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="disagree on the labels"):
        ensemble_scores([audio, wrong])


def test_predictions_file_and_id_rows_round_trip(tmp_path):
    path = str(tmp_path / "logits_test.npz")
    save_predictions(path, ["1001_DFA_ANG_XX", "é-clip"], np.array([3, 1]), np.ones((2, 6)))
    back = load_predictions(path)  # allow_pickle=False inside
    assert back["clip_id"].tolist() == ["1001_DFA_ANG_XX", "é-clip"] and back["label"].dtype == np.int64
    assert back["logits"].shape == (2, 6) and back["logits"].dtype == np.float32
    assert tensor_to_ids(ids_to_tensor(["x", "é-clip", ""]).numpy()) == ["x", "é-clip", ""]


def _run(root, method, modalities, seed, fused, probes, logits=None) -> Run:
    path = os.path.join(root, f"{method}_s{seed}")
    os.makedirs(path)
    if logits is not None:
        save_predictions(os.path.join(path, "logits_test.npz"), *logits)
    config = {"data": {"modalities": {m: "x" for m in modalities}, "test_part": "test"}}
    return Run(path=path, id=f"{method}_s{seed}", preset="resnet", method=method, fusion="late_linear", split="kfold1",
               seed=seed, block="study", config=config, records=[],
               test={"accuracy": fused, "probe_accuracy": probes})


def test_study_has_the_ensemble_row_and_paired_differences_to_it(tmp_path):
    runs = []
    joint_fused = {0: 0.70, 1: 0.49, 2: 0.37}  # about 30 points below the ensemble on every seed
    for seed in (0, 1, 2):
        # Seed s: audio right on a, b; visual right on c; d as planted; plus s wrong-for-both clips.
        extra = [f"x{i}" for i in range(seed)]
        ids = IDS + extra
        labels = np.concatenate([LABELS, np.zeros(seed, int)])
        wrong = np.log(np.tile([[0.1, 0.8, 0.1]], (seed, 1)))
        a, v = np.concatenate([AUDIO, wrong]), np.concatenate([VISUAL, wrong])
        runs.append(_run(tmp_path, "audio_only", ["audio"], seed, 0.5, {"audio": 0.5}, (ids, labels, a)))
        runs.append(_run(tmp_path, "visual_only", ["visual"], seed, 0.25, {"visual": 0.25}, (ids, labels, v)))
        runs.append(_run(tmp_path, "joint", ["audio", "visual"], seed, joint_fused[seed], {"audio": 0.5, "visual": 0.2}))
    study = setting_study(runs)
    ens = study["ensemble"]
    expect = [4 / (4 + s) for s in (0, 1, 2)]  # the ensemble gets the 4 planted clips, none of the extra ones
    assert ens["members"] == ["audio_only", "visual_only"] and ens["n"] == 3
    assert ens["fused"]["mean"] == pytest.approx(np.mean(expect))
    assert ens["oracle"]["mean"] == pytest.approx(np.mean([3 / (4 + s) for s in (0, 1, 2)]))
    (joint,) = [r for r in study["methods"] if r["method"] == "joint"]
    gap = joint["vs_ensemble"]["fused"]
    assert gap["mean"] == pytest.approx(np.mean([joint_fused[s] - e for s, e in zip((0, 1, 2), expect)]))
    assert gap["n"] == 3 and gap["hurts"]  # joint is clearly below the ensemble on every seed
    # Complementarity: the ensemble minus each control alone, paired over seeds.
    versus = ens["vs_control"]
    assert versus["audio"]["mean"] == pytest.approx(np.mean([e - 0.5 for e in expect]))
    assert versus["visual"]["mean"] == pytest.approx(np.mean([e - 0.25 for e in expect])) and versus["visual"]["helps"]
    text = tables.markdown({"study": {"study": study}, "data": {}})
    assert "| ensemble (audio_only + visual_only) | 3 |" in text and "Δ fused vs ensemble" in text
    assert f"**{100 * gap['mean']:+.1f} [" in text  # the bold (CI excludes 0) difference in the joint row


def test_a_control_without_logits_leaves_the_study_without_an_ensemble(tmp_path):
    runs = [_run(tmp_path, "audio_only", ["audio"], 0, 0.5, {"audio": 0.5}, (IDS, LABELS, AUDIO)),
            _run(tmp_path, "visual_only", ["visual"], 0, 0.25, {"visual": 0.25}),  # an older run: no logits file
            _run(tmp_path, "joint", ["audio", "visual"], 0, 0.5, {"audio": 0.5, "visual": 0.2})]
    study = setting_study(runs)
    assert "ensemble" not in study and all("vs_ensemble" not in r for r in study["methods"])
    assert "ensemble" not in tables.markdown({"study": {"study": study}, "data": {}})


def test_verdicts_cite_each_finding_with_its_interval(tmp_path):
    """Planted numbers: the verdict names the under-trained encoder, the cost against the
    ensemble, and says nothing is significant with two runs."""
    from experiments.verdicts import verdicts

    runs = []
    for seed in (0, 1, 2):
        extra = [f"x{i}" for i in range(seed)]
        labels = np.concatenate([LABELS, np.zeros(seed, int)])
        wrong = np.log(np.tile([[0.1, 0.8, 0.1]], (seed, 1)))
        ids = IDS + extra
        runs.append(_run(tmp_path, "audio_only", ["audio"], seed, [0.5, 0.45, 0.4][seed], {"audio": 0.5},
                         (ids, labels, np.concatenate([AUDIO, wrong]))))
        runs.append(_run(tmp_path, "visual_only", ["visual"], seed, 0.25, {"visual": 0.40 + 0.01 * seed},
                         (ids, labels, np.concatenate([VISUAL, wrong]))))
        runs.append(_run(tmp_path, "joint", ["audio", "visual"], seed, [0.70, 0.49, 0.37][seed],
                         {"audio": 0.5, "visual": 0.20 + 0.012 * seed}))
        runs.append(_run(tmp_path, "mlb", ["audio", "visual"], seed, [0.71, 0.50, 0.36][seed],
                         {"audio": 0.5, "visual": 0.35 + 0.01 * seed}))
    lines = verdicts(setting_study(runs))
    text = " ".join(lines)
    assert "The modalities complement each other: the unimodal ensemble beats the better control (audio_only) by" in text
    assert "No method closes the gap between joint training and the ensemble beyond its CI." in text
    # A method as good as the ensemble on every seed closes joint's gap; one a little above joint only narrows it.
    ensemble = [4 / 4, 4 / 5, 4 / 6]
    closing = [_run(tmp_path, "mmpareto", ["audio", "visual"], seed, ensemble[seed], {"audio": 0.5, "visual": 0.3})
               for seed in (0, 1, 2)]
    narrowing = [_run(tmp_path, "agm", ["audio", "visual"], seed, [0.75, 0.53, 0.43][seed], {"audio": 0.5, "visual": 0.2})
                 for seed in (0, 1, 2)]
    more = " ".join(verdicts(setting_study(runs + closing + narrowing)))
    assert "Close the gap to the ensemble (above joint beyond the CI, not below the ensemble beyond it): mmpareto (" in more
    assert "Narrow the gap but stay below the ensemble beyond the CI: agm (" in more
    # A method that changes the fused accuracy is named with the probe changes that came with it.
    assert re.search(r"Fused accuracy above joint beyond the CI: .*mmpareto \(\+[0-9.]+ points \[[^]]*\] \(n = 3\); "
                     r"visual probe \+[0-9.]+ points", more), more
    assert "Joint training under-trains the visual encoder" in text and "(n = 3)" in text
    assert "Imbalance costs fused accuracy: joint training differs from the unimodal ensemble" in text
    assert "No method changes the fused accuracy against joint beyond its CI (1 compared)" in text
    assert "Methods that change only the encoders" in text and "mlb (visual probe +14.8 points [" in text, lines
    assert "Below the unimodal ensemble beyond the CI: mlb" in text
    assert all(line.endswith(".") for line in lines)
    few = setting_study([r for r in runs if r.seed < 2])
    assert verdicts(few) == ["With 2 run(s) per method, no difference can be significant: the tables show means only."]

"""The parity report: float tolerances and decision-aware label comparison."""

import numpy as np

from staticprune.verify.parity import compare_outputs


def _logits_with_margins():
    # (1, 3 classes, 1, 4 pixels): pixel 0 near-tie (margin 1e-6), pixel 3 clear (margin 2.0)
    logits = np.zeros((1, 3, 1, 4), dtype=np.float32)
    logits[0, :, 0, 0] = [1.0, 1.0 + 1e-6, 0.0]
    logits[0, :, 0, 1] = [0.0, 0.5, 0.0]
    logits[0, :, 0, 2] = [0.3, 0.0, 0.0]
    logits[0, :, 0, 3] = [2.0, 0.0, 0.0]
    return logits


def test_near_tie_label_flip_is_reported_but_not_a_breach():
    ref_logits = _logits_with_margins()
    ref = {"logits": ref_logits, "labels": ref_logits.argmax(1).astype(np.int32)}
    got_labels = ref["labels"].copy()
    got_labels[0, 0, 0] = 0  # flipped at the near-tie
    diffs = compare_outputs({"logits": ref_logits + 5e-7, "labels": got_labels}, ref, tol=1e-4)
    logits, labels = diffs
    assert logits.ok and 4e-7 < logits.max_abs < 6e-7
    assert labels.mismatches == 1 and labels.breaches == 0 and labels.ok
    assert labels.min_flip_margin is not None and labels.min_flip_margin < 1e-5
    assert labels.agreement == 0.75


def test_clear_label_flip_and_large_error_fail():
    ref_logits = _logits_with_margins()
    ref = {"logits": ref_logits, "labels": ref_logits.argmax(1).astype(np.int32)}
    got_labels = ref["labels"].copy()
    got_labels[0, 0, 3] = 1  # margin 2.0: a genuine disagreement
    bad_logits = ref_logits.copy()
    bad_logits[0, 0, 0, 1] += 3e-4
    logits, labels = compare_outputs({"logits": bad_logits, "labels": got_labels}, ref, tol=1e-4)
    assert not logits.ok and abs(logits.max_abs - 3e-4) < 1e-6
    assert labels.breaches == 1 and not labels.ok


def test_nan_output_fails_even_if_max_is_small():
    ref = {"logits": np.zeros((1, 2, 2, 2), dtype=np.float32)}
    got = {"logits": np.full((1, 2, 2, 2), np.nan, dtype=np.float32)}
    (d,) = compare_outputs(got, ref)
    assert not d.ok


def test_decision_flip_at_near_tie_is_allowed_and_marks_features_not_comparable():
    ref = {
        "logits": np.zeros((1, 2, 2, 2), dtype=np.float32),
        "decision_layer1": np.array([[3, 1, 2]], dtype=np.int32),
        "margin_layer1": np.array([[1e-7, 0.5, 0.2]], dtype=np.float32),
    }
    got = dict(ref)
    got["decision_layer1"] = np.array([[0, 1, 2]], dtype=np.int32)  # flipped where the margin is 1e-7
    got["logits"] = ref["logits"] + 0.3  # everything downstream differs
    diffs = {d.name: d for d in compare_outputs(got, ref, tol=1e-4)}
    assert diffs["decision_layer1"].mismatches == 1 and diffs["decision_layer1"].breaches == 0
    assert diffs["decision_layer1"].min_margin == np.float32(1e-7)
    assert diffs["logits"].ok and not diffs["logits"].comparable


def test_decision_flip_with_clear_margin_is_a_breach():
    ref = {
        "decision_layer1": np.array([[3, 1, 2]], dtype=np.int32),
        "margin_layer1": np.array([[1e-7, 0.5, 0.2]], dtype=np.float32),
    }
    got = dict(ref)
    got["decision_layer1"] = np.array([[3, 0, 2]], dtype=np.int32)
    diffs = {d.name: d for d in compare_outputs(got, ref, tol=1e-4)}
    assert diffs["decision_layer1"].breaches == 1 and not diffs["decision_layer1"].ok


def test_decisions_downstream_of_a_near_tie_flip_are_not_comparable():
    """Layer 6 flips at a near-tie; layers 7 and 10 then differ a lot, layer 2 (upstream) must still be equal."""
    ref = {name: np.array([[1, 2, 3, 4]], dtype=np.int32) for name in
           ("decision_layer2", "decision_layer6", "decision_layer7", "decision_layer10")}
    for name in list(ref):
        ref[name.replace("decision_", "margin_")] = np.array([[1e-8, 0.5, 0.5, 0.5]], dtype=np.float32)
    ref["logits"] = np.zeros((1, 2), dtype=np.float32)
    got = {k: v.copy() for k, v in ref.items()}
    got["decision_layer6"][0, 0] = 9
    got["decision_layer7"][0, :] = 0
    got["decision_layer10"][0, :] = 0
    got["logits"] += 1.0
    diffs = {d.name: d for d in compare_outputs(got, ref)}
    assert diffs["decision_layer6"].ok and diffs["decision_layer6"].comparable
    assert diffs["decision_layer7"].ok and not diffs["decision_layer7"].comparable
    assert diffs["decision_layer10"].ok and not diffs["decision_layer10"].comparable
    assert diffs["logits"].ok and not diffs["logits"].comparable
    # an upstream point that differs with a clear margin is still a breach
    got["decision_layer2"][0, 1] = 7
    diffs = {d.name: d for d in compare_outputs(got, ref)}
    assert not diffs["decision_layer2"].ok

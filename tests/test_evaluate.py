"""Tests for cnnkit.evaluate: classification_metrics on hand-computed cases, and class_indices."""

import json
import math

import numpy as np
import pytest

from cnnkit.evaluate import class_indices, classification_metrics

NAMES = ["cat", "dog", "bird"]


def _one_hot_probs(predicted, num_classes, confidence=0.8):
    """Rows with ``confidence`` on the predicted class, the rest spread evenly."""
    rest = (1.0 - confidence) / (num_classes - 1)
    probs = np.full((len(predicted), num_classes), rest)
    probs[np.arange(len(predicted)), predicted] = confidence
    return probs


def test_hand_computed_three_classes_with_a_never_predicted_class():
    # true:      cat cat cat dog dog bird
    # predicted: cat cat dog dog dog dog      ("bird" is never predicted)
    y = [0, 0, 0, 1, 1, 2]
    probs = _one_hot_probs([0, 0, 1, 1, 1, 1], 3, confidence=0.8)
    m = classification_metrics(y, probs, NAMES)

    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [0, 1, 0]]
    assert m["num_examples"] == 6
    assert m["test_accuracy"] == pytest.approx(4 / 6)
    assert m["test_error"] == pytest.approx(2 / 6)
    # loss: correct rows -log(0.8) (4 of them), wrong rows -log(0.1) (2 of them)
    assert m["test_loss"] == pytest.approx((4 * -math.log(0.8) + 2 * -math.log(0.1)) / 6)

    cat, dog, bird = (m["per_class"][n] for n in NAMES)
    assert cat == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    # dog: predicted 4 times, 2 right; all 2 dogs found
    assert dog["precision"] == pytest.approx(0.5)
    assert dog["recall"] == pytest.approx(1.0)
    assert dog["f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert dog["support"] == 2
    # bird: never predicted -> precision 0.0 by convention, f1 0.0, not NaN
    assert bird == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # balanced accuracy = mean recall over the three present classes
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)


def test_balanced_accuracy_on_imbalanced_data_differs_from_accuracy():
    # 9 examples of class 0, 1 of class 1; the model always says class 0.
    y = [0] * 9 + [1]
    probs = _one_hot_probs([0] * 10, 2, confidence=0.9)
    m = classification_metrics(y, probs, ["common", "rare"])
    assert m["test_accuracy"] == pytest.approx(0.9)
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["per_class"]["rare"]["precision"] == 0.0
    assert m["per_class"]["common"]["precision"] == pytest.approx(0.9)


def test_balanced_accuracy_ignores_classes_absent_from_y_true():
    y = [0, 0, 1, 1]  # class 2 never occurs
    probs = _one_hot_probs([0, 1, 1, 2], 3)
    m = classification_metrics(y, probs, NAMES)
    # recalls: cat 1/2, dog 1/2; bird absent -> mean over two classes
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["per_class"]["bird"]["support"] == 0
    assert m["per_class"]["bird"]["precision"] == 0.0  # predicted once, wrong


def test_loss_is_clipped_at_1e_minus_7():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    m = classification_metrics([1, 1], probs, ["a", "b"])
    assert m["test_loss"] == pytest.approx(-math.log(1e-7) / 2)
    assert math.isfinite(m["test_loss"])


def test_split_prefix_and_label_shapes():
    probs = _one_hot_probs([0, 1], 2)
    m = classification_metrics(np.array([[0], [1]]), probs, ["a", "b"], split="val")
    assert {"val_accuracy", "val_error", "val_loss"} <= set(m)
    assert "test_accuracy" not in m
    assert m["val_accuracy"] == 1.0 and m["val_error"] == 0.0


def test_values_are_plain_python_and_json_serialisable():
    y = np.array([0, 1, 2, 1], dtype=np.int64)
    probs = _one_hot_probs([0, 1, 1, 1], 3).astype(np.float32)
    m = classification_metrics(y, probs, NAMES)
    assert json.loads(json.dumps(m)) == m
    assert type(m["test_accuracy"]) is float
    assert type(m["num_examples"]) is int
    assert all(type(v) is int for row in m["confusion_matrix"] for v in row)
    assert type(m["per_class"]["cat"]["support"]) is int
    assert type(m["per_class"]["cat"]["f1"]) is float


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"y_true.shape=\(3,\).*probabilities.shape=\(2, 3\)"):
        classification_metrics([0, 1, 2], np.full((2, 3), 1 / 3), NAMES)


@pytest.mark.parametrize(
    "y, probs, names, pattern",
    [
        ([0, 1], np.full((2, 2), 0.5), NAMES, r"len\(class_names\)=3"),
        ([0, 3], np.full((2, 3), 1 / 3), NAMES, r"\[0, 2\]"),
        ([0, -1], np.full((2, 3), 1 / 3), NAMES, r"\[-1\]"),
        ([0, 1], np.full(2, 0.5), ["a", "b"], r"probabilities.shape=\(2,\)"),
        ([], np.zeros((0, 2)), ["a", "b"], "zero examples"),
        ([0.5, 1.0], np.full((2, 2), 0.5), ["a", "b"], "integer class indices"),
        ([0, 1], np.array([[np.nan, 0.5], [0.5, 0.5]]), ["a", "b"], "NaN"),
        ([0, 1], np.full((2, 2), 0.5), ["a", "a"], "unique"),
        ([0, 1], np.full((2, 2), 0.5), None, r"`class_names` must be a sequence of names\. Received: class_names=None"),
    ],
)
def test_invalid_inputs_raise_value_error(y, probs, names, pattern):
    with pytest.raises(ValueError, match=pattern):
        classification_metrics(y, probs, names)


def test_class_indices_name_the_argument_and_the_values():
    np.testing.assert_array_equal(class_indices([[0], [2.0], [True]], 3), [0, 2, 1])
    assert class_indices(np.array([1], np.uint8), 2).dtype == np.int64
    with pytest.raises(ValueError, match=r"`labels` must hold integer class indices\. Received: labels=\[1\.5\]"):
        class_indices([1.5], 3, name="labels")
    with pytest.raises(ValueError, match=r"`labels` must hold integer class indices\. Received: labels.dtype=<U1"):
        class_indices(["a"], 3, name="labels")
    with pytest.raises(ValueError, match=r"`y_true` values must lie in \[0, 1\] \(one per class\)\. Received: y_true "
                                         r"containing \[9223372036854775809\]"):  # not wrapped round to negative
        class_indices(np.array([2**63 + 1], np.uint64), 2)
    with pytest.raises(ValueError, match=r"`y_true` must be a 1-D array .* Received: y_true.shape=\(2, 2\)"):
        class_indices([[0, 1], [1, 0]], 2)


def test_ties_go_to_the_lower_class_index():
    m = classification_metrics([1], np.array([[0.5, 0.5]]), ["a", "b"])
    assert m["confusion_matrix"] == [[0, 0], [1, 0]]


@pytest.mark.parametrize("probs, received", [
    ([[2.0, -1.0], [-3.0, 0.5]], r"values in \[-3, 2\], row sums in \[-2\.5, 1\]"),  # logits
    ([[5.0, 3.0], [0.0, 7.0]], r"values in \[0, 7\], row sums in \[7, 8\]"),  # scores above 1
    ([[0.5, 0.4], [0.2, 0.7]], r"values in \[0\.2, 0\.7\], row sums in \[0\.9, 0\.9\]"),  # rows short of 1
])
def test_values_that_are_not_probabilities_are_refused(probs, received):
    with pytest.raises(ValueError, match=r"`probabilities` must be class probabilities, each in \[0, 1\] and each row "
                                         r"summing to 1; these look like logits or scores \(apply a softmax first\)\. "
                                         r"Received: " + received):
        classification_metrics([0, 1], np.array(probs), ["a", "b"])


def test_probabilities_off_by_rounding_are_accepted():
    thirds = np.full((1, 3), 1 / 3, np.float16)  # sum 0.9998: float16 rounding
    above_one = np.array([[1 + 1e-6, 0.0, 0.0]])
    m = classification_metrics([0, 0], np.concatenate([thirds, above_one]), NAMES)
    assert m["test_accuracy"] == 1.0 and m["test_loss"] == pytest.approx(-math.log(float(thirds[0, 0])) / 2)

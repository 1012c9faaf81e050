"""Sensitivity: marginal means and spread per value, epsilon-squared importance, table, CSV and PNG."""

import csv
import io

import numpy as np
import pytest
from PIL import Image

from cnnkit.tuner import sensitivity

TRIALS = [({"k": 3, "lr": 0.01}, 0.97), ({"k": 5, "lr": 0.01}, 0.95), ({"k": 3, "lr": 0.1}, 0.96),
          ({"k": 5, "lr": 0.1}, 0.94)]


def test_marginal_means_spread_and_importance():
    result = sensitivity(TRIALS, objective="val_accuracy")
    k3 = next(row for row in result.rows if row["hyperparameter"] == "k" and row["value"] == "3")
    assert (k3["count"], k3["mean"], k3["min"], k3["max"]) == (2, pytest.approx(0.965), 0.96, 0.97)
    assert k3["std"] == pytest.approx(np.std([0.97, 0.96], ddof=1))
    # k: between 4e-4, within 1e-4 over 2 degrees of freedom, total 5e-4 -> (4e-4 - 5e-5) / 5e-4
    assert result.importance == [("k", pytest.approx(0.7)), ("lr", 0.0)]
    assert [row["hyperparameter"] for row in result.rows] == ["k", "k", "lr", "lr"]
    assert result.trials == 4


def test_one_trial_per_value_has_no_importance():
    trials = [({"lr": 0.1, "k": 3}, 0.9), ({"lr": 0.2, "k": 3}, 0.8), ({"lr": 0.3, "k": 5}, 0.7)]
    result = sensitivity(trials, objective="val_loss", direction="min")
    assert result.importance == [("k", pytest.approx(0.5)), ("lr", None)]  # (0.015 - 0.005) / 0.02
    assert "lr n/a" in result.table() and "lower is better" in result.table()


def test_many_numeric_values_fall_into_quantile_bins():
    rates = np.geomspace(1e-4, 1e-1, 12)
    trials = [({"learning_rate": float(rate)}, 0.9 - abs(np.log10(rate) + 2.5) / 10) for rate in rates]
    result = sensitivity(trials, objective="val_accuracy", bins=4)
    rows = [row for row in result.rows if row["hyperparameter"] == "learning_rate"]
    assert len(rows) == 4 and sum(row["count"] for row in rows) == 12
    assert all("-" in row["value"] for row in rows)


def test_close_bin_edges_keep_their_bins_apart():
    trials = [({"units": units, "rate": rate}, 0.9 + 0.01 * (units % 3))
              for units, rate in zip(range(1000, 1008), [0.1, 0.1000001, 0.1000002, 0.2, 0.2, 0.2, 0.2, 0.2])]
    result = sensitivity(trials, objective="val_accuracy", bins=4)
    units = [(row["value"], row["count"]) for row in result.rows if row["hyperparameter"] == "units"]
    assert units == [("1000-1002", 2), ("1002-1004", 2), ("1004-1005", 2), ("1005-1007", 2)]  # 1e+03 each at 3 digits
    assert [label for label, _ in result.points["units"]] == [label for label, _ in units for _ in range(2)]
    rates = [(row["value"], row["count"]) for row in result.rows if row["hyperparameter"] == "rate"]
    assert rates == [("0.1", 1), ("0.1000001", 1), ("0.1000002", 1), ("0.2", 5)]  # 0.1 each at 6 digits
    mixed = sensitivity([({"k": 3}, 0.9), ({"k": 3.0}, 0.8)], objective="val_accuracy")
    assert [row["value"] for row in mixed.rows] == ["3.0", "3"]


def test_fixed_values_and_missing_scores_are_left_out():
    trials = [({"k": 3, "units": 64}, 0.9), ({"k": 5, "units": 64}, 0.8), ({"k": 5, "units": 64}, None),
              ({"k": 3, "units": 64}, float("nan")), ({"k": 3, "units": 64}, 0.85)]
    result = sensitivity(trials, objective="val_accuracy")
    assert result.trials == 3
    assert {row["hyperparameter"] for row in result.rows} == {"k"}


def test_table_csv_and_plot(tmp_path):
    result = sensitivity(TRIALS, objective="val_accuracy", note="trials trained for 3 epochs only")
    table = result.table()
    assert table.splitlines()[1] == "trials trained for 3 epochs only"
    assert "importance (share of the variance explained by the hyperparameter alone): k 0.70, lr 0.00" in table
    rows = list(csv.DictReader(io.StringIO(result.to_csv())))
    assert len(rows) == 4 and float(rows[0]["importance"]) == pytest.approx(0.7) and rows[0]["count"] == "2"
    path = result.plot(tmp_path / "sensitivity.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 800


def test_nothing_to_compare_still_plots(tmp_path):
    result = sensitivity([({"k": 3}, 0.9)], objective="val_accuracy")
    assert result.rows == [] and "nothing to compare" in result.table()
    assert result.plot(tmp_path / "empty.png").stat().st_size > 0


@pytest.mark.parametrize("kwargs, message", [({"direction": "up"}, "direction"), ({"bins": 1}, "bins")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sensitivity(TRIALS, objective="val_accuracy", **kwargs)

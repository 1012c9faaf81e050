"""Tests for cnnkit.report: plots are real, non-blank PNGs; the model card holds the metrics."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit import report
from cnnkit.evaluate import classification_metrics

HISTORY = {
    "loss": [1.2, 0.8, 0.5, 0.4],
    "accuracy": [0.5, 0.7, 0.85, 0.9],
    "val_loss": [1.3, 0.9, 0.7, 0.65],
    "val_accuracy": [0.45, 0.65, 0.8, 0.82],
}


def _assert_real_png(path, min_bytes=5_000):
    path = Path(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > min_bytes
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.std() > 5.0, "image looks blank"
    # More than a few distinct grey levels: axes, text and lines were drawn.
    assert len(np.unique(pixels)) > 20
    return pixels


def _no_temp_files(directory):
    return [p.name for p in Path(directory).iterdir() if p.name.endswith(".tmp")] == []


def test_training_curves_png(tmp_path):
    out = report.plot_training_curves(HISTORY, tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    pixels = _assert_real_png(out)
    assert pixels.shape[1] > pixels.shape[0]  # two panels side by side
    assert _no_temp_files(tmp_path)


def test_learning_rate_adds_a_panel(tmp_path):
    two = report.plot_training_curves(HISTORY, tmp_path / "two.png")
    three = report.plot_training_curves(
        {**HISTORY, "learning_rate": [1e-3, 1e-3, 5e-4, 2.5e-4]}, tmp_path / "three.png"
    )
    with Image.open(two) as a, Image.open(three) as b:
        assert b.width > a.width * 1.3
        assert b.height == a.height
    _assert_real_png(three)


def test_training_curves_accepts_partial_histories(tmp_path):
    _assert_real_png(report.plot_training_curves({"loss": [1.0]}, tmp_path / "one_epoch.png"), min_bytes=3_000)
    _assert_real_png(
        report.plot_training_curves({"val_accuracy": [0.2, 0.4, 0.5]}, tmp_path / "val.png"), min_bytes=3_000
    )


def test_training_curves_reject_empty_history(tmp_path):
    with pytest.raises(ValueError, match="nothing to plot"):
        report.plot_training_curves({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="nothing to plot"):
        report.plot_training_curves({"top5": [0.3]}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_has_curves():
    assert report.has_curves(HISTORY)
    assert report.has_curves({"learning_rate": [0.1]})
    assert not report.has_curves({})
    assert not report.has_curves({"loss": []})
    assert report.has_curves({"loss": np.array([1.0, 0.5])})
    assert not report.has_curves({"loss": np.array([]), "accuracy": None})


def test_training_curves_of_numpy_arrays_are_those_of_lists(tmp_path):
    arrays = {**{key: np.array(values) for key, values in HISTORY.items()}, "learning_rate": np.array([0.1] * 4)}
    report.plot_training_curves(arrays, tmp_path / "arrays.png")
    report.plot_training_curves({**HISTORY, "learning_rate": [0.1] * 4}, tmp_path / "lists.png")
    assert (tmp_path / "arrays.png").read_bytes() == (tmp_path / "lists.png").read_bytes()
    _assert_real_png(tmp_path / "arrays.png")


def test_confusion_matrix_png_and_normalize_changes_it(tmp_path):
    matrix = [[50, 3, 0], [4, 40, 6], [0, 10, 20]]
    norm = report.plot_confusion_matrix(matrix, ["cat", "dog", "bird"], tmp_path / "norm.png")
    counts = report.plot_confusion_matrix(matrix, ["cat", "dog", "bird"], tmp_path / "counts.png", normalize=False)
    a = _assert_real_png(norm)
    b = _assert_real_png(counts)
    assert a.shape == b.shape
    assert np.abs(a - b).mean() > 0.5  # different cell values and annotations


def test_confusion_matrix_many_classes_and_empty_rows(tmp_path):
    k = 25  # above the annotation limit
    matrix = np.diag(np.arange(k))  # row 0 is empty -> stays 0 when normalised
    out = report.plot_confusion_matrix(matrix, [f"class_{i}" for i in range(k)], tmp_path / "big.png")
    pixels = _assert_real_png(out)
    assert pixels.shape[0] > 800  # the figure grows with the class count


@pytest.mark.parametrize(
    "matrix, names, pattern",
    [
        ([[1, 2, 3], [4, 5, 6]], ["a", "b"], r"matrix.shape=\(2, 3\)"),
        ([[1, 2], [3, 4]], ["a", "b", "c"], r"len\(class_names\)=3"),
        ([[1, -2], [3, 4]], ["a", "b"], "non-negative"),
    ],
)
def test_confusion_matrix_validation(tmp_path, matrix, names, pattern):
    with pytest.raises(ValueError, match=pattern):
        report.plot_confusion_matrix(matrix, names, tmp_path / "cm.png")


def test_confusion_matrix_draws_dollar_signs_as_written(tmp_path, monkeypatch):
    # "$$" used to raise an empty ValueError from mathtext, and "$5-$10" to render as math.
    names = ["$", "$$", "a$$b", "$5-$10"]
    figures = []
    save = report._save_figure
    monkeypatch.setattr(report, "_save_figure", lambda figure, path: figures.append(figure) or save(figure, path))
    _assert_real_png(report.plot_confusion_matrix(np.eye(4) * 3, names, tmp_path / "cm.png"))
    ax = figures[0].axes[0]
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        assert [label.get_text() for label in labels] == names
        assert not any(label.get_parse_math() for label in labels)


def test_confusion_matrix_draws_a_name_with_a_surrogate_escape_as_its_escape(tmp_path, monkeypatch):
    # A folder name with a byte that is not UTF-8 ("caf\xe9" in Latin-1) is read as "caf\udce9"; matplotlib refused it.
    figures = []
    save = report._save_figure
    monkeypatch.setattr(report, "_save_figure", lambda figure, path: figures.append(figure) or save(figure, path))
    _assert_real_png(report.plot_confusion_matrix(np.eye(2) * 3, ["caf\udce9", "tea"], tmp_path / "cm.png"))
    ax = figures[0].axes[0]
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        assert [label.get_text() for label in labels] == ["caf\\udce9", "tea"]


def test_plot_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "curves.png"
    target.write_bytes(b"old")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("cnnkit.runs.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        report.plot_training_curves(HISTORY, target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]


def test_plots_do_not_use_pyplot_or_tensorflow(tmp_path):
    code = (
        "import sys\n"
        "from cnnkit import report\n"
        f"report.plot_training_curves({{'loss': [1.0, 0.5]}}, {str(tmp_path / 'c.png')!r})\n"
        f"report.plot_confusion_matrix([[1, 0], [0, 1]], ['a', 'b'], {str(tmp_path / 'm.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "c.png").exists() and (tmp_path / "m.png").exists()


def _metrics():
    y = [0, 0, 0, 1, 1, 2]
    probs = np.eye(3)[[0, 0, 1, 1, 1, 1]] * 0.8 + 0.1 - np.eye(3)[[0, 0, 1, 1, 1, 1]] * 0.1
    return classification_metrics(y, probs, ["cat", "dog", "bird"])


def test_model_card_contains_what_when_and_how():
    metrics = _metrics()
    config = {
        "arch": "20C5-MP2-50C5-MP2-FC256",
        "data": "mnist-sample",
        "data_fingerprint": "sha256:abc123",
        "epochs": 7,
        "batch_size": 64,
        "learning_rate": 0.01,
        "seed": 42,
        "versions": {"keras": "3.15.1", "tensorflow": "2.21.0"},
    }
    card = report.model_card(
        name="lenet-demo",
        config=config,
        metrics=metrics,
        class_names=["cat", "dog", "bird"],
        summary='Model: "lenet"\nTotal params: 431,080',
    )
    assert card.startswith("# lenet-demo\n")
    # what was trained
    assert "20C5-MP2-50C5-MP2-FC256" in card
    assert "mnist-sample" in card
    assert "sha256:abc123" in card
    assert "| `epochs` | 7 |" in card and "| `batch_size` | 64 |" in card and "| `seed` | 42 |" in card
    # results: accuracy 4/6, error 2/6, balanced (2/3 + 1 + 0)/3 = 5/9
    assert "| Test accuracy | 0.6667 (66.67%) |" in card
    assert "| Test error | 0.3333 (33.33%) |" in card
    assert "| Balanced accuracy | 0.5556 (55.56%) |" in card
    assert "| bird | 0.0000 | 0.0000 | 0.0000 | 1 |" in card
    assert "| cat | 1.0000 | 0.6667 | 0.8000 | 3 |" in card
    assert "confusion_matrix.png" in card
    # how to load, model summary, versions
    assert 'cnnkit.load("runs/lenet-demo")' in card
    assert "Total params: 431,080" in card
    assert "| tensorflow | 2.21.0 |" in card


def test_model_card_reads_recipe_arguments_and_data_dict():
    config = {
        "recipe": "train",
        "arguments": {"arch": "lenet5", "epochs": 3, "batch_size": 32, "learning_rate": 0.05, "seed": 1},
        "data": {"source": "mnist-sample", "fingerprint": "fp-77", "class_counts": [5, 5]},
        "seed": 1,
    }
    card = report.model_card(name="r", config=config, metrics={}, class_names=["a", "b"], summary="")
    assert "| Architecture | `lenet5` |" in card
    assert "| Recipe | `train` |" in card
    assert "| Data | mnist-sample |" in card and "| Data fingerprint | `fp-77` |" in card
    assert "| `epochs` | 3 |" in card and "| `learning_rate` | 0.05 |" in card
    staged = {"recipe": "finetune", "arguments": {"backbone": "runs/x", "epochs": 5, "learning_rate": 0.001},
              "stages": [{"name": "stage1", "epochs": 10, "learning_rate": 0.001}]}
    card = report.model_card(name="f", config=staged, metrics={}, class_names=["a", "b"], summary="")
    assert "| `stages` |" in card and "| `epochs` |" not in card  # the stages' own epochs, not the unused default


def test_model_card_without_metrics_or_versions():
    card = report.model_card(name="bare", config={}, metrics={}, class_names=["0", "1"], summary="", run_dir="x/bare")
    assert "No evaluation metrics" in card
    assert 'cnnkit.load("x/bare")' in card
    assert "| keras |" in card  # current versions are filled in
    assert "confusion_matrix.png" not in card
    assert "training_curves.png" not in card
    card = report.model_card(name="b", config={}, metrics={}, class_names=["0"], summary="", history={"loss": [1.0]})
    assert "training_curves.png" in card


def test_model_card_escapes_pipes_in_class_names():
    metrics = classification_metrics([0, 1], np.eye(2), ["a|b", "c"])
    card = report.model_card(name="n", config={}, metrics=metrics, class_names=["a|b", "c"], summary="")
    assert "| a\\|b | 1.0000 |" in card

"""cnnkit.html_report: the diagnosis rules, member agreement, and pages of small runs, ensembles and searches.

The full report of a real MNIST run, opened in a browser, is tested in test_report_browser.py.
"""

import fcntl
import math
import os
import re
import shutil

import numpy as np
import pytest

import cnnkit
from cnnkit import html_report
from cnnkit.cli import main
from cnnkit.html_report import diagnose, member_agreement, render_report, write_report, write_search_report
from cnnkit.runs import verify_manifest

FAST = {"epochs": 1, "batch_size": 16, "precision": "float32"}


def _kinds(history):
    return [finding.kind for finding in diagnose(history)]


@pytest.mark.parametrize("history, kinds", [
    pytest.param({"loss": [1.0, 0.6, 0.4, 0.3, 0.25], "val_loss": [1.0, 0.65, 0.45, 0.36, 0.358],
                  "accuracy": [0.6, 0.8, 0.88, 0.9, 0.91], "val_accuracy": [0.6, 0.78, 0.86, 0.89, 0.9]},
                 ["gap", "healthy"], id="healthy"),
    pytest.param({"loss": [1.0, 0.5, 0.3, 0.2, 0.1], "val_loss": [1.0, 0.6, 0.7, 0.8, 0.9],
                  "accuracy": [0.6, 0.85, 0.92, 0.96, 0.99], "val_accuracy": [0.6, 0.8, 0.8, 0.8, 0.79]},
                 ["overfitting", "gap"], id="overfitting"),
    pytest.param({"loss": [2.3, 1.8, 2.5, 2.0, 2.6, 2.4]}, ["lr_too_high"], id="lr-too-high"),
    pytest.param({"loss": [1.0, 0.8, 1.1]}, ["lr_too_high"], id="no-net-progress"),
    pytest.param({"loss": [2.30, 2.25, 2.20, 2.15, 2.10], "val_loss": [2.29, 2.24, 2.19, 2.14, 2.09]},
                 ["lr_too_low", "still_improving"], id="lr-too-low"),
    pytest.param({"loss": [0.10, 0.09, 0.085, 0.08], "accuracy": [0.97, 0.975, 0.978, 0.98]},
                 ["still_improving", "healthy"], id="slow-but-already-accurate"),
    pytest.param({"loss": [0.9, 0.5], "val_loss": [0.6, 0.4]}, ["too_short", "still_improving"], id="two-epochs"),
    pytest.param({"loss": [0.9], "val_loss": [0.3], "accuracy": [0.7], "val_accuracy": [0.9]}, ["too_short"],
                 id="one-epoch"),
    pytest.param({"loss": [1.0, math.nan, math.nan], "val_loss": [1.0, 2.0, 3.0]}, ["diverged"], id="diverged"),
    pytest.param({}, ["no_history"], id="no-history"),
])
def test_diagnosis_rules(history, kinds):
    assert _kinds(history) == kinds


def test_diagnosis_messages_carry_the_numbers_and_the_advice():
    overfit = diagnose({"loss": [1.0, 0.5, 0.3, 0.2, 0.1], "val_loss": [1.0, 0.6, 0.7, 0.8, 0.9]})[0]
    assert overfit.severity == "warning"
    assert "lowest at epoch 2 (0.6)" in overfit.message and "50% higher at epoch 5" in overfit.message
    assert "early_stopping" in overfit.message
    high = diagnose({"loss": [2.3, 1.8, 2.5, 2.0, 2.6, 2.4]})[0]
    assert "rose in 2 of 5 epochs" in high.message and "lower" in high.message
    assert "did not fall (2.3 at epoch 1" in diagnose({"loss": [2.3, 2.3, 2.3]})[0].message
    diverged = diagnose({"loss": [1.0, math.inf]})[0]
    assert diverged.severity == "error" and "epoch 2" in diverged.message
    below = diagnose({"loss": [1.0, 0.5], "accuracy": [0.7, 0.85], "val_accuracy": [0.8, 0.9]})
    assert [f.severity for f in below if f.kind == "gap"] == ["ok"]  # validation above training is no problem
    with pytest.raises(ValueError, match="Received: history of type list"):
        diagnose([1.0, 0.5])


def test_diagnosis_reads_numpy_histories_and_a_validation_minimum_of_zero():
    history = {"loss": [1.0, 0.5, 0.3, 0.2, 0.1], "val_loss": [1.0, 0.6, 0.7, 0.8, 0.9],
               "accuracy": [0.6, 0.85, 0.92, 0.96, 0.99], "val_accuracy": [0.6, 0.8, 0.8, 0.8, 0.79]}
    assert diagnose({key: np.array(values) for key, values in history.items()}) == diagnose(history)
    [overfit] = diagnose({"loss": [1.0, 0.5, 0.3, 0.2, 0.1], "val_loss": [0.5, 0.0, 0.1, 0.2, 0.3]})
    assert overfit.kind == "overfitting"
    assert "lowest at epoch 2 (0) and ended above it (0.3) at epoch 5 while" in overfit.message


def test_member_agreement():
    labels = np.array([0, 1, 1, 0])
    a = np.eye(2)[[0, 1, 1, 1]]  # right on 0, 1, 2
    b = np.eye(2)[[0, 0, 1, 0]]  # right on 0, 2, 3
    c = np.eye(2)[[0, 1, 1, 0]] * 0.6 + 0.2  # right everywhere
    agreement = member_agreement([a, b, c], labels)
    assert agreement["member_accuracy"] == [0.75, 0.75, 1.0]
    assert agreement["pairwise"][0] == [1.0, 0.5, 0.75] and agreement["pairwise"][1][2] == 0.75
    assert agreement["all_agree"] == 0.5  # images 0 and 2
    assert agreement["accuracy_when_all_agree"] == 1.0 and agreement["oracle_accuracy"] == 1.0
    assert agreement["mean_accuracy"] == 1.0 and agreement["accuracy_when_split"] == 1.0
    with pytest.raises(ValueError, match="one \\(N, K\\) array per member"):
        member_agreement([a], labels[:3])
    assert member_agreement([a, b, c], labels.astype(float)) == agreement  # whole-number float labels
    with pytest.raises(ValueError, match=r"`labels` must hold integer class indices\. Received: labels=\[0\. +1\.5"):
        member_agreement([a, b, c], [0, 1.5, 1, 0])
    with pytest.raises(ValueError, match=r"`labels` values must lie in \[0, 1\] \(one per class\)\. Received: labels "
                                         r"containing \[2\]"):
        member_agreement([a, b, c], [0, 2, 1, 0])
    with pytest.raises(ValueError, match=r"one \(N, K\) array per member, all of one shape\. Received: shapes "
                                         r"\[\(4, 2\), \(4, 3\)\]"):
        member_agreement([a, np.full((4, 3), 1 / 3)], labels)


def test_member_agreement_of_an_ensemble_that_does_not_average():
    labels = [0, 1]
    a = b = np.array([[0.55, 0.45], [0.2, 0.8]])  # image 0: a and b say 0 (right), c says 1 with all its weight
    c = np.array([[0.0, 1.0], [0.2, 0.8]])
    vote = np.array([[0.6, 0.4], [0.2, 0.8]])  # what a vote makes of it: 0, where the mean probability says 1
    mean = member_agreement([a, b, c], labels)
    assert mean["accuracy_when_split"] == 0.0 and mean["ensemble_accuracy"] == mean["mean_accuracy"] == 0.5
    voted = member_agreement([a, b, c], labels, combined=vote)
    assert voted["accuracy_when_split"] == 1.0 and voted["accuracy_when_all_agree"] == 1.0
    assert voted["ensemble_accuracy"] == 1.0 and voted["mean_accuracy"] == 0.5
    with pytest.raises(ValueError, match=r"`combined` must be the ensemble's \(N, K\) output, of the members' shape "
                                         r"\(2, 2\)\. Received: shape \(2,\)"):
        member_agreement([a, b, c], labels, combined=[0, 1])


def test_the_weakest_class_is_one_with_test_images():
    from cnnkit.evaluate import classification_metrics

    probabilities = np.array([[0.9, 0.1, 0], [0.2, 0.8, 0], [0.1, 0.9, 0], [0.2, 0.8, 0], [0.6, 0.4, 0]])
    metrics = classification_metrics([0, 0, 1, 1, 1], probabilities, ["cat", "dog", "rare"])
    assert metrics["per_class"]["rare"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert "The weakest class: <b>cat</b> (F1 0.500)." in html_report._metrics_html(metrics)
    untested = {"per_class": {"a": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}}}
    page = html_report._metrics_html(untested)
    assert "weakest" not in page and "<p>Precision: of the images predicted as a class" in page


@pytest.fixture(scope="session")
def tiny():
    """90 8x8 images of 3 classes (a bright band per class) with a test split, in memory."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 60, (90, 8, 8, 1), dtype=np.uint8)
    y = np.arange(90) % 3
    for label in range(3):
        x[y == label, 2 * label:2 * label + 3] += 180
    return cnnkit.data.from_arrays(x[:60], y[:60], x_test=x[60:], y_test=y[60:], val_split=0.2, seed=0)


@pytest.fixture(scope="session")
def tiny_run(tiny, tmp_path_factory):
    return cnnkit.recipes.train("4C3-MP2-FC8", tiny, run_dir=tmp_path_factory.mktemp("tiny") / "run", verbose=0, **FAST)


def _sections(page):
    return re.findall(r'<h2 id="([^"]+)">', page)


def test_a_run_without_loadable_data_still_renders_and_says_what_is_missing(tiny_run):
    page = render_report(tiny_run.run_dir)
    assert "No test images" in page and "in-memory arrays" in page and "--data NAME" in page
    assert _sections(page) == ["summary", "metrics", "confusion-matrix", "training", "kernels", "layers",
                               "configuration"]
    assert page.count("<img ") == 3  # confusion matrix, curves, kernels
    assert "Could not draw" not in page
    with pytest.raises(ValueError, match=r"data: mnist-sample .* has other classes than the run: 10 classes "
                                         r"\[0, 1, 2, 3, 4, 5, \.\.\.\] against 3 classes \[0, 1, 2\]"):
        render_report(tiny_run.run_dir, model=tiny_run.model, data="mnist-sample")  # given: used or refused


def test_given_data_adds_the_parts_that_need_images(tiny_run, tiny):
    page = render_report(tiny_run.run_dir, model=tiny_run.model, data=tiny, examples=4)
    assert _sections(page) == ["summary", "metrics", "confusion-matrix", "training", "mistakes", "kernels",
                               "feature-maps", "grad-cam", "layers", "configuration"]
    assert "No test images" not in page and "Could not draw" not in page
    assert "4C3-MP2-FC8" in page and "conv1" in page  # the planner's table
    assert page.count('src="data:image/png;base64,') == page.count("<img ") >= 6
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing to fetch
    fewer = render_report(tiny_run.run_dir, model=tiny_run.model, data=tiny, max_test_images=10)
    assert "One test image in 3 is used (10 of 30, max_test_images=10)" in fewer and "mistakes" in _sections(fewer)


def test_a_run_fine_tuned_from_a_saved_run_gets_feature_maps_and_grad_cam(tiny_run, tiny, tmp_path):
    tuned = cnnkit.recipes.finetune(tiny_run.run_dir, tiny, stages=[{"unfreeze": "all", "epochs": 1, "learning_rate": 1e-2}],
                                    run_dir=tmp_path / "tuned", verbose=0, report=False)
    page = render_report(tuned.run_dir, model=tuned.model, data=tiny, examples=4)  # its backbone: nested, flat output
    assert {"kernels", "feature-maps", "grad-cam"} <= set(_sections(page)) and "Could not draw" not in page


def test_a_keras_file_gets_its_metrics_computed_from_the_data(tiny_run, tiny, tmp_path):
    model_path = tmp_path / "model.keras"
    tiny_run.model.save(model_path)
    written = write_report(model_path, data=tiny, strict=True)
    assert written == tmp_path / "model.html"
    page = written.read_text()
    assert "computed now on the test split" in page
    accuracy = re.search(r"test_accuracy</td><td>([0-9.]+)", page).group(1)
    assert float(accuracy) == pytest.approx(tiny_run.metrics["test_accuracy"], abs=1e-4)
    assert "No layer table" in page  # a bare model has no recorded notation
    images, labels = tiny.arrays("test")
    order = np.argsort(labels, kind="stable")  # class-sorted, as from_folder lists a test folder
    by_class = cnnkit.data.from_arrays(images, labels, x_test=images[order], y_test=labels[order], val_split=0)
    sampled = render_report(model_path, data=by_class, max_test_images=10)
    assert "One test image in 3 is used (10 of 30" in sampled
    support = [int(count) for count in re.findall(r"<tr><td class=l>\d</td>.*?<td>(\d+)</td></tr>", sampled)]
    assert len(support) == 3 and all(count > 0 for count in support), support  # every class, not the first only


def test_a_report_into_a_run_another_process_holds_is_refused_then_written_with_its_manifest(tiny_run, tiny, tmp_path,
                                                                                           capsys):
    run_dir = shutil.copytree(tiny_run.run_dir, tmp_path / "run")
    manifest = (run_dir / "manifest.json").read_bytes()
    other = os.open(run_dir, os.O_RDONLY)  # another process training there, or writing its report
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(RuntimeError, match=f"run directory {run_dir} is in use by another process"):
            write_report(run_dir, model=tiny_run.model, data=tiny, strict=True)
        assert (run_dir / "manifest.json").read_bytes() == manifest  # nothing read, changed and written over it
        capsys.readouterr()
        assert main(["report", str(run_dir)]) == 2
        assert capsys.readouterr().err == f"cnnkit: error: run directory {run_dir} is in use by another process " \
                                          "(training or finishing there); wait for it to end, or give another directory\n"
    finally:
        os.close(other)
    assert write_report(run_dir, model=tiny_run.model, data=tiny, strict=True) == run_dir / "report.html"
    assert (run_dir / "manifest.json").read_bytes() != manifest and verify_manifest(run_dir) == []


def test_run_files_are_checked_and_named_when_the_model_is_given_too(tiny_run, tmp_path):
    run_dir = shutil.copytree(tiny_run.run_dir, tmp_path / "run")
    (run_dir / "training_curves.png").write_bytes(b"garbage")  # would be embedded as it is
    for model in (tiny_run.model, None):
        with pytest.raises(ValueError, match=r"does not match its manifest.json: training_curves.png: SHA-256 differs"):
            render_report(run_dir, model=model)
    (run_dir / "manifest.json").unlink()  # a run written before manifests: nothing to check, files still parsed
    (run_dir / "training_curves.png").write_bytes((tiny_run.run_dir / "training_curves.png").read_bytes())
    for name, text, problem in (("config.yaml", "- 1\n", "must hold a mapping. Received: list"),
                                ("metrics.json", "{oops", "is not valid JSON"),
                                ("history.csv", "epoch,loss\n1,abc\n", "is not valid CSV")):
        saved = (run_dir / name).read_text()
        (run_dir / name).write_text(text)
        for model in (tiny_run.model, None):
            with pytest.raises(ValueError, match=f"'{run_dir / name}' {problem}"):
                render_report(run_dir, model=model)
        (run_dir / name).write_text(saved)
    assert "summary" in _sections(render_report(run_dir, model=tiny_run.model))


def test_a_failing_part_becomes_a_note_and_a_failing_report_only_warns(tiny_run, tiny, monkeypatch, tmp_path):
    def broken(model):
        raise RuntimeError("kernel trouble")

    monkeypatch.setattr(html_report, "_kernels_html", broken)
    page = render_report(tiny_run.run_dir, model=tiny_run.model, data=tiny)
    assert "Could not draw this part: RuntimeError: kernel trouble" in page and "grad-cam" in _sections(page)
    with pytest.warns(UserWarning, match="could not write the report"):
        assert write_report(tmp_path / "missing") is None
    with pytest.raises(FileNotFoundError, match="No run directory"):
        write_report(tmp_path / "missing", strict=True)
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_an_ensemble_run_reports_how_its_members_agree(tiny, tiny_run, tmp_path):
    untrained = cnnkit.build("4C3-FC8", (8, 8, 1), 3)
    run = cnnkit.recipes.ensemble([tiny_run.run_dir, untrained], tiny, run_dir=tmp_path / "ens", verbose=0)
    page = (run.run_dir / "report.html").read_text()  # written by the recipe
    assert "members" in _sections(page)
    assert "images all members classify alike" in page and "some member right (oracle)" in page
    assert "kernels" not in _sections(page) and "Could not draw" not in page
    assert page.count("<img ") == 3  # confusion matrix, mistakes, agreement (an ensemble has no curves)


def test_the_member_agreement_of_a_vote_ensemble_shows_its_own_accuracy(tiny):
    import keras

    from cnnkit.recipes.ensemble import combine_models

    images, labels = tiny.arrays("test")
    keras.utils.set_random_seed(3)
    model = combine_models([cnnkit.build("4C3-FC8", (8, 8, 1), 3) for _ in range(3)], combine="vote")
    own = float(np.mean(model.predict(images.astype(np.float32), verbose=0).argmax(axis=1) == labels))
    members = [member.predict(images.astype(np.float32), verbose=0) for member in model.layers[1:-1]]
    assert member_agreement(members, labels)["mean_accuracy"] != own  # the mean probability would say otherwise
    page = html_report._members_html(model, images, labels.astype(np.int64))
    assert f"ensemble accuracy (combine=vote)</td><td>{own:.2%}</td>" in page and "mean probability" not in page


def test_a_run_without_config_yaml_says_so(tiny_run, tmp_path):
    run_dir = shutil.copytree(tiny_run.run_dir, tmp_path / "run")
    (run_dir / "manifest.json").unlink()  # a run written before manifests, its config.yaml lost
    (run_dir / "config.yaml").unlink()
    page = render_report(run_dir)
    assert f"No test images: {run_dir} has no config.yaml (or an empty one) to say what data the run used." in page
    assert f"No layer table: {run_dir} has no config.yaml (or an empty one) to name the architecture" in page
    assert "in-memory arrays" not in page and "given as an object" not in page


def test_a_search_directory_gets_a_trials_and_sensitivity_page(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 100, (64, 8, 8), dtype=np.uint8)
    y = np.arange(64) % 2
    x[y == 1, :4] += 150
    data = cnnkit.data.from_arrays(x, y, val_split=0.25, seed=0)
    space = {"name": "tiny", "arch": "{f}C3-MP2-FC8", "hyperparameters": {"f": [2, 4], "learning_rate": 0.05}}
    result = cnnkit.tuner.search(space, data, max_trials=2, epochs=1, precision="float32", verbose=0,
                                 directory=tmp_path / "search")
    page = result.files["report"].read_text()
    assert _sections(page) == ["trials", "sensitivity"]
    assert "2C3-MP2-FC8" in page and "4C3-MP2-FC8" in page and "val_accuracy" in page
    assert f"Best: trial {result.best_trial.trial_id}" in page and "best_recipe.yaml" in page
    assert page.count('<img src="data:image/png;base64,') == 1
    (tmp_path / "search" / "report.html").unlink()
    assert main(["report", str(tmp_path / "search")]) == 0
    assert (tmp_path / "search" / "report.html").is_file() and "report written to" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="not a search directory"):
        write_search_report(tmp_path, strict=True)

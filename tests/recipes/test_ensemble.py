import fcntl
import importlib
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

import cnnkit
from cnnkit.recipes.ensemble import (
    AverageViews,
    CombineProbabilities,
    ImageViews,
    combine_models,
    ensemble,
    with_tta,
)

ARCH = "4C3-FC8"
FAST = {"epochs": 1, "batch_size": 16, "precision": "float32"}  # float32: exact comparisons


@pytest.fixture(scope="session")
def data():
    """60 random 8x8 images of 3 classes; the first 18 again as the test split."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60, 8, 8, 1), dtype=np.uint8)
    y = np.arange(60) % 3
    return cnnkit.data.from_arrays(x, y, x_test=x[:18], y_test=y[:18], seed=0)


@pytest.fixture(scope="session")
def seeded(data, tmp_path_factory):
    """An ensemble of two members of ARCH, seeds 0 and 1."""
    return ensemble(2, data, arch=ARCH, train_options=FAST, run_dir=tmp_path_factory.mktemp("ens") / "seeds",
                    verbose=0)


def _members(run):
    return [cnnkit.load(run.run_dir / "members" / str(index)) for index in range(2)]


def _test_images(data):
    return data.arrays("test")[0]


def test_members_from_seeds_are_averaged(seeded, data):
    members = _members(seeded)
    assert [member.config["seed"] for member in members] == [0, 1]
    assert not np.allclose(members[0].model.get_layer("conv1").kernel, members[1].model.get_layer("conv1").kernel)
    x = _test_images(data)
    expected = np.mean([member.predict(x) for member in members], axis=0)
    np.testing.assert_allclose(seeded.predict(x), expected, atol=1e-6)
    assert seeded.metrics["member_test_accuracy"] == [member.metrics["test_accuracy"] for member in members]
    assert seeded.metrics["num_members"] == 2 and seeded.metrics["num_examples"] == 18
    assert seeded.config["recipe"] == "ensemble" and seeded.config["members"] == [
        str(seeded.run_dir / "members" / "0"), str(seeded.run_dir / "members" / "1")]
    assert [layer.name for layer in seeded.model.layers] == ["image", "member_0", "member_1", "probabilities"]


def test_ensemble_saves_loads_and_exports_identically(seeded, data, tmp_path):
    x = _test_images(data)
    expected = seeded.predict(x)
    np.testing.assert_array_equal(cnnkit.load(seeded.run_dir).predict(x), expected)
    reloaded = keras.saving.load_model(seeded.run_dir / "model.keras")
    np.testing.assert_array_equal(cnnkit.Run(reloaded).predict(x), expected)
    assert reloaded.get_layer("probabilities").get_config()["mode"] == "mean"
    seeded.model.export(str(tmp_path / "saved"), verbose=False)
    exported = tf.saved_model.load(str(tmp_path / "saved"))  # kept: its functions need its variables alive
    np.testing.assert_allclose(exported.serve(tf.constant(x, tf.float32)).numpy(), expected, atol=1e-6)


def test_members_from_existing_runs_vote_and_tta(seeded, data, tmp_path):
    paths = [seeded.run_dir / "members" / "0", str(seeded.run_dir / "members" / "1" / "model.keras")]
    run = ensemble(paths, data, combine="vote", tta="flip", run_dir=tmp_path / "voted", verbose=0)
    assert not (tmp_path / "voted" / "members").exists()  # nothing trained
    x = _test_images(data)
    probabilities = np.stack([member.predict(x) for member in _members(seeded)])
    votes = np.eye(3)[probabilities.argmax(-1)].sum(0)
    np.testing.assert_allclose(run.predict(x), (votes + probabilities.mean(0)) / 3, atol=1e-6)
    assert run.metrics["member_test_accuracy"] == seeded.metrics["member_test_accuracy"]
    flipped = cnnkit.Run(with_tta(run.model, "flip"), class_names=data.class_names).evaluate(data)
    assert run.metrics["tta_test_accuracy"] == flipped["test_accuracy"]
    assert run.config["members"] == [str(path) for path in paths] and run.config["tta"] == "flip"


def test_members_from_run_and_model_objects(seeded, data, tmp_path):
    first, second = _members(seeded)
    run = ensemble([first, second.model], data, combine="geometric", run_dir=tmp_path / "objects", verbose=0)
    assert run.config["members"] == [str(first.run_dir), f"<keras.Model {second.model.name}>"]
    assert run.model.get_layer("probabilities").mode == "geometric"


def test_members_from_different_architectures(data, tmp_path):
    run = ensemble([ARCH, "FC6"], data, train_options=FAST, seed=3, run_dir=tmp_path / "archs", verbose=0)
    configs = [cnnkit.load(tmp_path / "archs" / "members" / str(index)).config for index in range(2)]
    assert [(config["arch"], config["seed"]) for config in configs] == [(ARCH, 3), ("FC6", 4)]
    kinds = [{type(layer).__name__ for layer in run.model.get_layer(f"member_{index}").layers} for index in range(2)]
    assert "Conv2D" in kinds[0] and "Conv2D" not in kinds[1]


def test_snapshot_ensemble_takes_one_member_per_cycle(data, tmp_path):
    options = {**FAST, "epochs": 2, "optimizer": "momentum", "learning_rate": 0.05}
    run = ensemble("snapshot", data, arch=ARCH, snapshot_cycles=2, train_options=options,
                   run_dir=tmp_path / "snap", verbose=0)
    assert sorted(path.name for path in (tmp_path / "snap" / "snapshots").iterdir()) == ["cycle_1.keras", "cycle_2.keras"]
    training = cnnkit.load(tmp_path / "snap" / "training")
    assert training.config["arguments"]["schedule"] == {"name": "cosine", "cycles": 2}
    kernels = [run.model.get_layer(f"member_{index}").get_layer("conv1").kernel.numpy() for index in range(2)]
    assert not np.allclose(kernels[0], kernels[1])
    np.testing.assert_array_equal(kernels[1], training.model.get_layer("conv1").kernel.numpy())  # last cycle = end
    assert len(run.metrics["member_test_accuracy"]) == 2


@pytest.mark.parametrize("mode", ["mean", "geometric", "vote"])
def test_combine_modes_match_numpy(mode):
    rng = np.random.default_rng(1)
    members = rng.dirichlet(np.ones(4), size=(3, 5)).astype("float32")  # 3 members, 5 images, 4 classes
    combined = CombineProbabilities(mode)(list(members)).numpy()
    if mode == "mean":
        expected = members.mean(0)
    elif mode == "geometric":
        expected = np.exp(np.log(members + 1e-7).mean(0))
        expected /= expected.sum(-1, keepdims=True)
    else:
        expected = (np.eye(4)[members.argmax(-1)].sum(0) + members.mean(0)) / 4
    np.testing.assert_allclose(combined, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(combined.sum(-1), 1.0, rtol=1e-5)
    assert combined.dtype == np.float32


def test_vote_majority_wins_and_ties_go_to_the_higher_mean():
    weak_majority = [np.array([[0.4, 0.35, 0.25]]), np.array([[0.4, 0.35, 0.25]]), np.array([[0.0, 1.0, 0.0]])]
    assert CombineProbabilities("vote")(weak_majority).numpy().argmax() == 0  # the mean would pick class 1
    tie = [np.array([[0.6, 0.4, 0.0]]), np.array([[0.1, 0.5, 0.4]])]  # one vote each for classes 0 and 1
    np.testing.assert_allclose(CombineProbabilities("vote")(tie).numpy(), [[(1 + 0.35) / 3, (1 + 0.45) / 3, 0.2 / 3]])


@pytest.mark.parametrize("layer", [CombineProbabilities("geometric", epsilon=1e-6), ImageViews("crops", shift=2),
                                   AverageViews(5)])
def test_layers_round_trip_their_config(layer):
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def test_mismatched_members_are_rejected(data, tmp_path):
    small, other = cnnkit.build(ARCH, (8, 8, 1), 3), cnnkit.build(ARCH, (10, 10, 1), 3)
    with pytest.raises(ValueError, match=r"must agree on input shape and class count .*member 1 \(\w+\) takes "
                                         r"\(10, 10, 1\) images and gives 3 classes"):
        combine_models([small, other])
    four_classes = cnnkit.build(ARCH, (8, 8, 1), 4)
    with pytest.raises(ValueError, match=r"\(the data's: \(8, 8, 1\) images, 3 classes\): <keras.Model \w+> takes "
                                         r"\(8, 8, 1\) images and gives 4 classes"):
        ensemble([small, four_classes], data, verbose=0, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # a failed start leaves no folder behind


@pytest.mark.parametrize("kwargs, message", [
    ({"members": 2, "arch": ARCH, "combine": "median"}, "combine must be one of .* Received: combine='median'"),
    ({"members": 2, "arch": ARCH, "tta": "rotate"}, "tta must be one of .* Received: tta='rotate'"),
    ({"members": 0, "arch": ARCH}, "members must be at least 1"),
    ({"members": 2}, "trains networks: pass arch="),
    ({"members": [ARCH], "arch": ARCH}, "arch applies when members is a count or 'snapshot'"),
    ({"members": "snapshot", "arch": ARCH}, "snapshot_cycles goes with members='snapshot'"),
    ({"members": 2, "arch": ARCH, "snapshot_cycles": 2}, "snapshot_cycles goes with members='snapshot'"),
    ({"members": "snapshot", "arch": ARCH, "snapshot_cycles": 2, "train_options": {"epochs": 3}},
     r"snapshot_cycles must be an integer >= 1 that divides the epochs \(3\)"),
    ({"members": "snapshot", "arch": ARCH, "snapshot_cycles": 2, "train_options": {"epochs": 2, "schedule": "step"}},
     "may not set 'schedule'"),
    ({"members": "snapshot", "arch": ARCH, "snapshot_cycles": 2, "train_options": {"epochs": 2, "ema": 0.99}},
     "may not set 'ema'"),
    ({"members": "snapshot", "arch": ARCH, "snapshot_cycles": 2, "train_options": {"epochs": 2, "precise_bn": 64}},
     "may not set 'precise_bn'"),
    ({"members": "snapshot", "arch": ARCH, "snapshot_cycles": 2, "train_options": {"epochs": 2, "imbalance": "two_stage"}},
     "imbalance='two_stage' trains a balanced stage after the last one"),
    ({"members": "snapshot", "arch": ARCH, "snapshot_cycles": 2,
      "train_options": {"epochs": 2, "imbalance": {"strategy": "two_stage", "second_stage_epochs": 1}}},
     "imbalance='two_stage' trains a balanced stage after the last one"),
    ({"members": 2, "arch": ARCH, "train_options": {"seed": 1}}, "may not set 'seed': the ensemble sets it"),
    ({"members": 2, "arch": ARCH, "train_options": {"epoch": 1}}, "unknown train option 'epoch'; valid: .*'epochs'"),
    ({"members": "lenet"}, "members must be a count, 'snapshot', or a list"),
    ({"members": [ARCH, 3]}, "member 1 must be an architecture"),
    ({"members": ["runs/missing"]}, "member 0: no run directory or .keras file at 'runs/missing'"),
    ({"members": [ARCH, "lenet5x"]}, r"^member 1: unknown model 'lenet5x'; did you mean lenet5, .*; as notation, .*; "
                                     r"and no run directory or .keras file named 'lenet5x'$"),
    ({"members": [ARCH, "runs_old"]}, r"^member 1: unknown model 'runs_old'; .*; and no run directory or .keras file "
                                      r"named 'runs_old'$"),
    ({"members": 2, "arch": "lenet5x"}, r"^unknown model 'lenet5x'; did you mean lenet5, .*; as notation, token 1"),
    ({"members": 2, "arch": ARCH, "seed": 2**32 - 1},
     r"^seed must be an integer in \[0, 4294967295\) \(2 members: member 1 trains with seed \+ 1\)\. "
     r"Received: seed=4294967295$"),
    ({"members": "snapshot", "arch": ARCH, "snapshot_cycles": 1, "seed": -1},
     r"^seed must be an integer in \[0, 4294967296\)\. Received: seed=-1$"),
])
def test_bad_arguments_fail_before_anything_is_written(data, tmp_path, kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ensemble(data=data, run_dir=tmp_path / "run", verbose=0, **kwargs)
    assert not (tmp_path / "run").exists()


def test_members_trained_on_other_classes_are_refused(seeded, data, tmp_path):
    x, y = data.arrays("train")
    renamed = cnnkit.data.from_arrays(x, y, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"members/0 was trained on classes \['0', '1', '2'\]; the data has "
                                         r"\['a', 'b', 'c'\]"):
        ensemble([seeded.run_dir / "members" / "0"], renamed, run_dir=tmp_path / "renamed", verbose=0)
    with pytest.raises(ValueError, match=r"model.keras was trained on classes \['0', '1', '2'\]"):  # its run's names
        ensemble([seeded.run_dir / "members" / "0" / "model.keras"], renamed, run_dir=tmp_path / "renamed", verbose=0)
    reordered = cnnkit.Run(_members(seeded)[0].model, class_names=["2", "1", "0"])
    with pytest.raises(ValueError, match=r"was trained on classes \['2', '1', '0'\]; the data has \['0', '1', '2'\]"):
        ensemble([reordered], data, run_dir=tmp_path / "reordered", verbose=0)
    assert not (tmp_path / "renamed").exists() and not (tmp_path / "reordered").exists()


def test_the_same_run_twice_by_path_is_refused(seeded, data, tmp_path):
    member = seeded.run_dir / "members" / "0"
    with pytest.raises(ValueError, match=f"the same run is given as two members \\({member}\\)"):
        ensemble([member, member / "model.keras"], data, run_dir=tmp_path / "twice", verbose=0)


def test_the_same_run_as_an_object_and_by_path_is_refused(seeded, data, tmp_path):
    member = seeded.run_dir / "members" / "0"
    another_name = member.parent / ".." / "members" / "0"
    for members in ([cnnkit.load(member), member], [cnnkit.load(member), cnnkit.load(another_name)]):
        with pytest.raises(ValueError, match=f"the same run is given as two members \\({member}\\)"):
            ensemble(members, data, run_dir=tmp_path / "twice", verbose=0)
    assert not (tmp_path / "twice").exists()


def test_overwrite_refuses_members_inside_the_run_dir_it_would_delete(seeded, data, tmp_path):
    run_dir = tmp_path / "ens"
    shutil.copytree(seeded.run_dir, run_dir)
    members = [run_dir / "members" / "0", run_dir / "members" / "1"]
    with pytest.raises(ValueError, match=f"^member 0 \\({members[0]}\\) lies inside run_dir {run_dir}, which "
                                         "overwrite=True deletes before the members load"):
        ensemble(members, data, combine="vote", run_dir=run_dir, overwrite=True, verbose=0)
    assert all((member / "model.keras").is_file() for member in members)
    assert (run_dir / "model.keras").is_file()  # the finished ensemble is kept too


def test_tta_without_a_test_split_warns_and_records_no_tta_metrics(seeded, data, tmp_path):
    x, y = data.arrays("train")
    members = [seeded.run_dir / "members" / "0", seeded.run_dir / "members" / "1"]
    with pytest.warns(UserWarning, match="^tta='crops' evaluates the test split and the data has none"):
        run = ensemble(members, cnnkit.data.from_arrays(x, y), tta="crops", run_dir=tmp_path / "notest", verbose=0)
    assert run.metrics == {"num_members": 2}


def test_numpy_integers_are_accepted_as_counts_and_shifts(seeded, data, tmp_path, monkeypatch):
    module = importlib.import_module("cnnkit.recipes.ensemble")
    seeds = []

    def train(*args, **kwargs):  # the member of that seed from the seeded ensemble, not trained again
        seeds.append(kwargs["seed"])
        return cnnkit.load(seeded.run_dir / "members" / str(kwargs["seed"]))

    monkeypatch.setattr(module, "train", train)
    run = ensemble(np.int64(2), data, arch=ARCH, train_options=FAST, run_dir=tmp_path / "count", verbose=0)
    assert seeds == [0, 1] and run.metrics["num_members"] == 2 and type(run.config["arguments"]["members"]) is int
    with pytest.raises(ValueError, match="combine must be one of"):  # past the snapshot_cycles check, to the next
        ensemble("snapshot", data, arch=ARCH, snapshot_cycles=np.int64(2), train_options={"epochs": np.int64(4)},
                 combine="median", run_dir=tmp_path / "snap", verbose=0)
    views = with_tta(cnnkit.build(ARCH, (8, 8, 1), 3), "crops", shift=np.int64(2)).get_layer("views")
    assert views.shift == 2 and type(views.get_config()["shift"]) is int


def test_a_vote_ensemble_exports_to_tflite_and_onnx(seeded, data, tmp_path):
    run = ensemble([seeded.run_dir / "members" / "0", seeded.run_dir / "members" / "1"], data, combine="vote",
                   run_dir=tmp_path / "voted", verbose=0)
    for fmt in ("tflite", "onnx"):  # verified in a fresh process against the Keras model
        report = cnnkit.export(run, tmp_path / fmt, format=fmt, verbose=0)
        assert (report / "verification.json").is_file()


def test_an_ensemble_that_fails_while_writing_resumes_and_overwrite_rebuilds_it(seeded, data, tmp_path, monkeypatch):
    import sys

    members = [seeded.run_dir / "members" / "0", seeded.run_dir / "members" / "1"]
    module = sys.modules["cnnkit.recipes.ensemble"]
    real = module.write_run

    def killed_after_the_metrics(run_dir, **kwargs):
        real(run_dir, **kwargs)
        (run_dir / "manifest.json").unlink(missing_ok=True)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(module, "write_run", killed_after_the_metrics)
    with pytest.raises(KeyboardInterrupt):
        ensemble(members, data, run_dir=tmp_path / "ens", verbose=0)
    probe = os.open(tmp_path / "ens", os.O_RDONLY)  # released: another process may take it over
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(probe)
    monkeypatch.undo()
    run = ensemble(members, data, run_dir=tmp_path / "ens", verbose=0)  # interrupted, not finished: it resumes
    assert run.metrics["num_members"] == 2 and not (tmp_path / "ens" / "backup").exists()
    with pytest.raises(ValueError, match="already holds a finished run; pass overwrite=True"):
        ensemble(members, data, run_dir=tmp_path / "ens", verbose=0)
    written = (tmp_path / "ens" / "model.keras").stat().st_mtime_ns
    again = ensemble(members, data, run_dir=tmp_path / "ens", overwrite=True, verbose=0)
    assert (tmp_path / "ens" / "model.keras").stat().st_mtime_ns != written and again.metrics["num_members"] == 2


def test_the_same_model_twice_is_refused(data):
    model = cnnkit.build(ARCH, (8, 8, 1), 3)
    with pytest.raises(ValueError, match="the same model object is given as two members"):
        ensemble([model, cnnkit.Run(model)], data, verbose=0)


def test_finished_members_are_reused_and_must_match(seeded, data, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="already holds a finished run"):
        ensemble(2, data, arch=ARCH, train_options=FAST, run_dir=seeded.run_dir, verbose=0)
    shutil.copytree(seeded.run_dir / "members", tmp_path / "resumed" / "members")
    module = importlib.import_module("cnnkit.recipes.ensemble")
    monkeypatch.setattr(module, "train", lambda *args, **kwargs: pytest.fail("a finished member was retrained"))
    resumed = ensemble(2, data, arch=ARCH, train_options=FAST, run_dir=tmp_path / "resumed", verbose=0)
    x = _test_images(data)
    np.testing.assert_array_equal(resumed.predict(x), seeded.predict(x))
    shutil.copytree(seeded.run_dir / "members", tmp_path / "other" / "members")
    with pytest.raises(ValueError, match=r"trained with other settings \(epochs\)"):
        ensemble(2, data, arch=ARCH, train_options={**FAST, "epochs": 3}, run_dir=tmp_path / "other", verbose=0)
    # an option left out now is at its default, which the member must have been trained with too
    shutil.copytree(seeded.run_dir / "members", tmp_path / "default" / "members")
    with pytest.raises(ValueError, match=r"trained with other settings \(batch_size\)"):
        ensemble(2, data, arch=ARCH, train_options={"epochs": 1, "precision": "float32"}, run_dir=tmp_path / "default",
                 verbose=0)


def test_a_tuple_option_matches_the_list_its_member_recorded(data, tmp_path, monkeypatch):
    options = {**FAST, "augment": ("shift",)}
    ensemble(1, data, arch=ARCH, train_options=options, run_dir=tmp_path / "first", verbose=0)
    shutil.copytree(tmp_path / "first" / "members", tmp_path / "resumed" / "members")
    module = importlib.import_module("cnnkit.recipes.ensemble")
    monkeypatch.setattr(module, "train", lambda *args, **kwargs: pytest.fail("a finished member was retrained"))
    ensemble(1, data, arch=ARCH, train_options=options, run_dir=tmp_path / "resumed", verbose=0)


def test_flip_tta_of_a_mirror_symmetric_image_is_the_plain_prediction():
    model = cnnkit.build(ARCH, (8, 8, 1), 3)
    half = np.random.default_rng(2).integers(0, 256, (4, 8, 4, 1))
    images = np.concatenate([half, half[:, :, ::-1]], axis=2).astype("float32")  # left-right symmetric
    plain = np.asarray(model(images))
    np.testing.assert_allclose(np.asarray(with_tta(model, "flip")(images)), plain, atol=1e-6)
    assert not np.allclose(np.asarray(with_tta(model, "crops")(images)), plain, atol=1e-6)


def test_crop_views_are_shifted_zero_padded_images():
    images = np.random.default_rng(3).integers(1, 256, (2, 6, 5, 1)).astype("float32")
    views = ImageViews("ten_crop", shift=1)(images).numpy().reshape(10, 2, 6, 5, 1)
    padded = np.pad(images, [(0, 0), (1, 1), (1, 1), (0, 0)])
    crops = [padded[:, top:top + 6, left:left + 5] for top, left in [(1, 1), (0, 0), (0, 2), (2, 0), (2, 2)]]
    np.testing.assert_array_equal(views[:5], crops)
    np.testing.assert_array_equal(views[5:], [crop[:, :, ::-1] for crop in crops])
    np.testing.assert_array_equal(views[0], images)  # the centre crop is the image


@pytest.mark.parametrize("mode", ["flip", "crops", "ten_crop"])
def test_tta_model_keeps_the_shapes_and_round_trips(mode, tmp_path):
    model = cnnkit.build(ARCH, (8, 8, 1), 3)
    tta = with_tta(model, mode)
    images = np.random.default_rng(4).integers(0, 256, (5, 8, 8, 1)).astype("float32")
    probabilities = np.asarray(tta(images))
    assert tta.output_shape == (None, 3) and probabilities.shape == (5, 3)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
    tta.save(tmp_path / "tta.keras")
    np.testing.assert_array_equal(np.asarray(keras.saving.load_model(tmp_path / "tta.keras")(images)), probabilities)
    assert tta.get_layer("views").shift == 1  # max(1, 8 // 16)


@pytest.mark.parametrize("members, cycles", [(2, None), ("snapshot", 2)])
def test_a_model_object_as_arch_is_refused_before_anything_is_written(data, tmp_path, members, cycles):
    model = cnnkit.build(ARCH, (8, 8, 1), 3)  # every member would train this one object again
    with pytest.raises(ValueError, match=rf"members={members!r} trains networks: pass arch= \(notation or a registered "
                                         r"name\); to combine trained models, pass them or their run directories as "
                                         r"the members list. Received: arch=<Functional name=cnnkit_net"):
        ensemble(members, data, arch=model, snapshot_cycles=cycles, train_options={"epochs": 2},
                 run_dir=tmp_path / "run", verbose=0)
    assert not (tmp_path / "run").exists()


def test_with_tta_names_its_mode_parameter():
    with pytest.raises(ValueError, match=r"^mode must be one of \('flip', 'crops', 'ten_crop'\)\. "
                                         r"Received: mode=None$"):
        with_tta(cnnkit.build(ARCH, (8, 8, 1), 3), None)


@pytest.mark.parametrize("epsilon", [0.0, -1.0, float("inf")])
def test_a_geometric_mean_needs_a_positive_epsilon(epsilon):
    with pytest.raises(ValueError, match=rf"^epsilon must be a finite number > 0\. Received: epsilon={epsilon}$"):
        CombineProbabilities("geometric", epsilon=epsilon)
    certain = [np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])]  # log(0): NaN without epsilon
    np.testing.assert_allclose(CombineProbabilities("geometric")(certain).numpy(), [[0.5, 0.5]])


def test_average_views_checks_its_view_count():
    with pytest.raises(ValueError, match=r"^num_views must be an integer >= 1\. Received: num_views=0$"):
        AverageViews(0)
    with pytest.raises(ValueError, match=r"3 views per image need a row count that is a multiple of 3\. "
                                         r"Received: 4 rows"):
        AverageViews(3)(np.ones((4, 3), "float32"))
    assert AverageViews(np.int64(2))(np.ones((4, 3), "float32")).shape == (2, 3)


def test_a_shift_as_large_as_the_image_is_refused():
    images = np.ones((2, 6, 5, 1), "float32")
    assert ImageViews("crops", shift=4)(images).shape == (10, 6, 5, 1)
    for layer in (ImageViews("crops", shift=5), ImageViews("ten_crop", shift=40)):
        with pytest.raises(ValueError, match=r"shift must be less than the image's height and width \(a corner crop "
                                             rf"would be all padding\). Received: shift={layer.shift} for 6x5 images"):
            layer(images)
    with pytest.raises(ValueError, match=r"Received: shift=8 for 8x8 images"):
        with_tta(cnnkit.build(ARCH, (8, 8, 1), 3), "crops", shift=8)

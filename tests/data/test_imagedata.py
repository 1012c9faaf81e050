"""Tests of ImageData and from_arrays."""

from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cnnkit.data import ImageData, from_arrays


def tagged_images(n, h=4, w=5, c=None):
    """n images whose first two pixels encode the example index (so splits can be traced)."""
    shape = (n, h, w) if c is None else (n, h, w, c)
    x = np.zeros(shape, np.uint8)
    flat = x.reshape(n, -1)
    flat[:, 0] = np.arange(n) % 256
    flat[:, 1] = np.arange(n) // 256
    return x


def index_of(images):
    flat = images.reshape(len(images), -1).astype(np.int64)
    return flat[:, 0] + 256 * flat[:, 1]


def labels_with_counts(counts):
    return np.concatenate([np.full(n, c) for c, n in enumerate(counts)]).astype(np.int64)


# --- shapes, dtypes, datasets ---------------------------------------------------------------


def test_adds_channel_axis_and_builds_unbatched_uint8_int32_datasets():
    x = tagged_images(12)
    y = np.arange(12) % 3
    data = from_arrays(x, y, val_split=0)
    assert data.image_shape == (4, 5, 1)
    image_spec, label_spec = data.train.element_spec
    assert image_spec.shape == (4, 5, 1) and image_spec.dtype == tf.uint8
    assert label_spec.shape == () and label_spec.dtype == tf.int32
    images, labels = zip(*data.train.as_numpy_iterator())
    np.testing.assert_array_equal(np.stack(images)[..., 0], x)
    np.testing.assert_array_equal(labels, y)
    assert data.val is None and data.test is None
    assert data.class_counts == {"train": [4, 4, 4]}
    assert data.sizes == {"train": 12}
    assert data.num_classes == 3
    assert data.class_names == ["0", "1", "2"]
    assert data.source == "arrays"
    assert data.skipped == []


def test_rgb_images_kept_and_labels_of_shape_n_by_1_accepted():
    x = np.random.default_rng(0).integers(0, 256, (6, 3, 3, 3), dtype=np.uint8)
    y = np.array([[0], [1], [0], [1], [0], [1]], np.uint8)
    data = from_arrays(x, y, val_split=0)
    assert data.image_shape == (3, 3, 3)
    images, labels = data.arrays("train")
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, [0, 1, 0, 1, 0, 1])
    assert labels.dtype == np.int32


def test_integer_pixels_in_range_are_cast_to_uint8():
    x = np.full((4, 2, 2), 255, np.int64)
    x[0] = 0
    data = from_arrays(x, [0, 1, 0, 1], val_split=0)
    images, _ = data.arrays("train")
    assert images.dtype == np.uint8
    np.testing.assert_array_equal(images[..., 0], x)


def test_test_split_and_default_class_names_cover_test_labels():
    x, y = tagged_images(8), np.array([0, 1, 2, 3] * 2)
    x_test, y_test = tagged_images(5), np.array([0, 1, 2, 3, 4])
    data = from_arrays(x, y, x_test=x_test, y_test=y_test, val_split=0)
    assert data.class_names == ["0", "1", "2", "3", "4"]
    assert data.class_counts == {"train": [2, 2, 2, 2, 0], "test": [1, 1, 1, 1, 1]}
    assert data.sizes == {"train": 8, "test": 5}
    images, labels = data.arrays("test")
    np.testing.assert_array_equal(images[..., 0], x_test)
    np.testing.assert_array_equal(labels, y_test)


def test_class_names_given():
    data = from_arrays(tagged_images(4), [0, 1, 1, 0], class_names=["cat", "dog", "eel"])
    assert data.class_names == ["cat", "dog", "eel"]
    assert from_arrays(tagged_images(4), [0, 1, 1, 0], class_names=(n for n in "ab")).class_names == ["a", "b"]
    assert data.num_classes == 3
    assert data.class_counts["train"][2] == 0


@pytest.mark.parametrize("names", [{"a", "b"}, frozenset({"a", "b"}), {"a": 0, "b": 1}.keys(),
                                   {0: "a", 1: "b"}.values()])
def test_class_names_and_subset_classes_without_a_fixed_order_are_refused(names):
    reason = (rf"must be a list, in label order, not a {type(names).__name__} \(a set's order, and so the labels, can "
              r"change from one process to the next\)\. Received: ")
    with pytest.raises(ValueError, match=rf"class_names {reason}class_names="):
        from_arrays(tagged_images(4), [0, 1, 1, 0], class_names=names)
    data = from_arrays(tagged_images(4), [0, 1, 1, 0], class_names=["a", "b"], val_split=0)
    with pytest.raises(ValueError, match=rf"classes {reason}classes="):
        data.subset(classes=names)


# --- validation split -----------------------------------------------------------------------


def test_val_split_is_stratified_with_round_half_up_and_at_least_one():
    counts = [100, 50, 10, 2, 1, 25]
    y = labels_with_counts(counts)
    data = from_arrays(tagged_images(len(y)), y, val_split=0.1)
    # round(0.1 * n): 10, 5, 1; n=2 -> at least 1; n=1 -> stays in train; 2.5 -> 3 (half up)
    assert data.class_counts["val"] == [10, 5, 1, 1, 0, 3]
    assert data.class_counts["train"] == [90, 45, 9, 1, 1, 22]
    assert data.sizes == {"train": 168, "val": 20}


def test_val_split_partitions_the_examples_and_keeps_labels_with_images():
    y = labels_with_counts([30, 20, 10])
    x = tagged_images(len(y))
    data = from_arrays(x, y, val_split=0.25, seed=3)
    train_x, train_y = data.arrays("train")
    val_x, val_y = data.arrays("val")
    train_ids, val_ids = index_of(train_x), index_of(val_x)
    assert sorted(np.concatenate([train_ids, val_ids]).tolist()) == list(range(len(y)))
    np.testing.assert_array_equal(train_y, y[train_ids])
    np.testing.assert_array_equal(val_y, y[val_ids])
    # original order is kept inside each split
    assert np.all(np.diff(train_ids) > 0) and np.all(np.diff(val_ids) > 0)
    # datasets give the same as arrays()
    ds_ids = [int(index_of(img[None])[0]) for img, _ in data.val.as_numpy_iterator()]
    assert ds_ids == val_ids.tolist()


def test_split_is_deterministic_per_seed_and_differs_across_seeds():
    y = labels_with_counts([40, 40])
    x = tagged_images(len(y))

    def val_ids(seed):
        return index_of(from_arrays(x, y, val_split=0.2, seed=seed).arrays("val")[0]).tolist()

    assert val_ids(0) == val_ids(0)
    assert val_ids(0) != val_ids(1)


def test_val_split_zero_means_no_val():
    data = from_arrays(tagged_images(6), [0, 1] * 3, val_split=0)
    assert data.val is None
    assert "val" not in data.class_counts and "val" not in data.sizes
    with pytest.raises(ValueError, match="no 'val' split"):
        data.arrays("val")


@pytest.mark.parametrize("val_split, n, expected", [(0.29, 50, 15), (0.57, 50, 29), (0.58, 25, 15), (0.35, 90, 32),
                                                    (0.29, 49, 14), (0.1, 25, 3)])
def test_val_count_rounds_the_decimal_val_split_times_n_half_up(val_split, n, expected):
    # 0.29 * 50 is 14.499999999999998 in binary floating point, but the documented rounding is of 14.5
    data = from_arrays(tagged_images(n), np.zeros(n, np.int64), val_split=val_split)
    assert data.class_counts["val"] == [expected]


def test_no_class_with_two_examples_warns_and_gives_no_val():
    with pytest.warns(UserWarning, match="no validation split"):
        data = from_arrays(tagged_images(3), [0, 1, 2], val_split=0.5)
    assert data.val is None and data.sizes == {"train": 3}


@settings(max_examples=25, deadline=None)
@given(
    counts=st.lists(st.integers(0, 30), min_size=1, max_size=5).filter(lambda c: sum(c) > 0),
    val_split=st.one_of(st.floats(0.01, 0.99), st.integers(1, 99).map(lambda percent: percent / 100)),
    seed=st.integers(0, 2**31),
)
@example(counts=[50, 1], val_split=0.29, seed=0)  # 14.5 exactly, 14.4999... in floating point
def test_stratified_split_property(counts, val_split, seed):
    y = labels_with_counts(counts)
    x = tagged_images(len(y))
    data = from_arrays(
        x, y, val_split=val_split, seed=seed, class_names=[f"c{i}" for i in range(len(counts))]
    )

    def half_up(n):  # val_split * n on the decimal written, rounded half up exactly
        return int((Decimal(repr(val_split)) * n).quantize(Decimal(1), rounding=ROUND_HALF_UP))

    expected_val = [0 if n < 2 else min(max(half_up(n), 1), n - 1) for n in counts]
    if sum(expected_val) == 0:
        assert data.val is None
        return
    assert data.class_counts["val"] == expected_val
    assert data.class_counts["train"] == [n - v for n, v in zip(counts, expected_val)]
    ids = np.concatenate([index_of(data.arrays(s)[0]) for s in ("train", "val")])
    assert sorted(ids.tolist()) == list(range(len(y)))


# --- fingerprint, summary, arrays -------------------------------------------------------------


def test_fingerprint_identifies_content_and_split():
    x, y = tagged_images(10), np.arange(10) % 2
    fp = from_arrays(x, y).fingerprint
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert from_arrays(x.copy(), y.copy()).fingerprint == fp
    split = from_arrays(x, y, val_split=0.3, seed=5).fingerprint
    assert split != fp  # another training set: resuming or reusing a run must not mix them
    assert from_arrays(x, y, val_split=0.3, seed=5).fingerprint == split
    assert from_arrays(x, y, val_split=0.3, seed=6).fingerprint != split
    assert from_arrays(x, y, val_split=0, seed=6).fingerprint == from_arrays(x, y, val_split=0).fingerprint
    assert from_arrays(x[..., None], y.astype(np.uint8)).fingerprint == fp  # same content
    x2 = x.copy()
    x2[3, 2, 2] = 7
    assert from_arrays(x2, y).fingerprint != fp
    assert from_arrays(x, 1 - y).fingerprint != fp
    assert from_arrays(x, y, class_names=["a", "b"]).fingerprint != fp
    assert from_arrays(x, y, x_test=x[:2], y_test=y[:2]).fingerprint != fp


def test_summary_and_repr():
    y = labels_with_counts([8, 4])
    data = from_arrays(
        tagged_images(12),
        y,
        x_test=tagged_images(3),
        y_test=[0, 1, 1],
        class_names=["ants", "bees"],
        val_split=0.25,
    )
    text = data.summary()
    assert "arrays" in text
    assert "4x5x1" in text
    assert "2 classes: ants, bees" in text
    assert "train: 9 (per class 3-6)" in text
    assert "val: 3 (per class 1-2)" in text
    assert "test: 3 (per class 1-2)" in text
    assert data.fingerprint[:12] in text
    assert "sizes={'train': 9, 'val': 3, 'test': 3}" in repr(data)


def test_arrays_bad_split_name():
    data = from_arrays(tagged_images(4), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="Received: split='validation'"):
        data.arrays("validation")


def test_arrays_iterates_a_replaced_dataset_instead_of_stale_cache():
    data = from_arrays(tagged_images(4), [0, 1, 0, 1], val_split=0)
    data.train = data.train.take(2)
    images, labels = data.arrays("train")
    assert images.shape == (2, 4, 5, 1) and labels.tolist() == [0, 1]
    assert not images.flags.writeable and not labels.flags.writeable


@pytest.mark.parametrize("val_split", [0, 0.5])
def test_arrays_are_read_only_and_not_the_callers_buffers(val_split):
    x, x_test = tagged_images(6), tagged_images(3)
    data = from_arrays(x, np.arange(6) % 2, x_test=x_test, y_test=[0, 1, 0], val_split=val_split)
    x[:], x_test[:] = 7, 7  # the caller reuses its buffers
    for split in data.sizes:
        images, labels = data.arrays(split)
        dataset_images = np.stack([image for image, _ in getattr(data, split).as_numpy_iterator()])
        np.testing.assert_array_equal(images, dataset_images)
        assert (images != 7).any()
        with pytest.raises(ValueError, match="assignment destination is read-only"):
            images[0] = 99
        with pytest.raises(ValueError, match="assignment destination is read-only"):
            labels[0] = 1
    kept = np.concatenate([index_of(data.arrays(split)[0]) for split in data.sizes if split != "test"])
    assert sorted(kept.tolist()) == list(range(6))  # still the content the fingerprint was taken of
    np.testing.assert_array_equal(data.arrays("test")[0][..., 0], tagged_images(3))
    assert not data.subset(classes=["1"]).arrays("train")[0].flags.writeable


def test_imagedata_can_be_built_directly_and_arrays_iterates():
    ds = tf.data.Dataset.from_tensor_slices(
        (np.ones((3, 2, 2, 1), np.uint8), np.array([0, 1, 1], np.int32))
    )
    data = ImageData(
        train=ds,
        val=None,
        test=ds,
        class_names=["a", "b"],
        image_shape=(2, 2, 1),
        class_counts={"train": [1, 2], "test": [1, 2]},
        source="custom",
        fingerprint="0" * 64,
    )
    images, labels = data.arrays("test")
    assert images.shape == (3, 2, 2, 1) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 1] and labels.dtype == np.int32
    assert data.skipped == [] and data.sizes == {"train": 3, "test": 3}


# --- argument errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x, y, kwargs, message",
    [
        (
            np.zeros((4, 3, 3), np.float32),
            [0, 1, 0, 1],
            {},
            r"raw 0-255 pixel.*Received: x\.dtype=float32",
        ),
        (np.zeros((4, 3, 3, 2), np.uint8), [0, 1, 0, 1], {}, r"Received: x\.shape=\(4, 3, 3, 2\)"),
        (np.zeros((4, 3), np.uint8), [0, 1, 0, 1], {}, r"Received: x\.shape=\(4, 3\)"),
        (
            np.zeros((0, 3, 3), np.uint8),
            [],
            {},
            r"must not be empty. Received: x\.shape=\(0, 3, 3, 1\)",
        ),
        (
            np.full((2, 3, 3), 256, np.int32),
            [0, 1],
            {},
            r"0\.\.255. Received: x\.min\(\)=256, x\.max\(\)=256",
        ),
        (np.full((2, 3, 3), -1, np.int16), [0, 1], {}, r"Received: x\.min\(\)=-1"),
        (
            np.zeros((4, 3, 3), np.uint8),
            [0, 1, 0],
            {},
            r"same length. Received: len\(x\)=4, len\(y\)=3",
        ),
        (np.zeros((2, 3, 3), np.uint8), [0, -1], {}, r"Received: y\.min\(\)=-1"),
        (np.zeros((2, 3, 3), np.uint8), [0.0, 1.0], {}, r"Received: y\.dtype=float64"),
        (np.zeros((2, 3, 3), np.uint8), np.eye(2, dtype=int), {}, r"Received: y\.shape=\(2, 2\)"),
        (
            np.zeros((2, 3, 3), np.uint8),
            [0, 2],
            {"class_names": ["a", "b"]},
            r"Received: y\.max\(\)=2",
        ),
        (np.zeros((2, 3, 3), np.uint8), [0, 1], {"class_names": ["a", "a"]}, r"repeated: \['a'\]"),
        (
            np.zeros((2, 3, 3), np.uint8),
            [0, 1],
            {"class_names": "ab"},
            r"Received: class_names='ab'",
        ),
        (np.zeros((2, 3, 3), np.uint8), [0, 1], {"val_split": 1.0}, r"Received: val_split=1\.0"),
        (np.zeros((2, 3, 3), np.uint8), [0, 1], {"val_split": -0.1}, r"Received: val_split=-0\.1"),
        (
            np.zeros((2, 3, 3), np.uint8),
            [0, 1],
            {"val_split": "0.1"},
            r"Received: val_split='0\.1'",
        ),
        (np.zeros((2, 3, 3), np.uint8), [0, 1], {"seed": -1}, r"Received: seed=-1"),
        (
            np.zeros((2, 3, 3), np.uint8),
            [0, 1],
            {"x_test": np.zeros((1, 3, 3), np.uint8)},
            r"together.*y_test=None",
        ),
        (
            np.zeros((2, 3, 3), np.uint8),
            [0, 1],
            {"x_test": np.zeros((1, 4, 3), np.uint8), "y_test": [0]},
            r"Received: x_test\.shape=\(1, 4, 3, 1\)",
        ),
        (
            np.zeros((2, 3, 3), np.uint8),
            [0, 1],
            {"x_test": np.zeros((2, 3, 3), np.uint8), "y_test": [0]},
            r"Received: len\(x_test\)=2, len\(y_test\)=1",
        ),
        (
            np.zeros((2, 3, 3), np.uint8),
            [0, 1],
            {"x_test": np.zeros((1, 3, 3), np.uint8), "y_test": [5], "class_names": ["a", "b"]},
            r"Received: y_test\.max\(\)=5",
        ),
        (np.zeros((2, 3, 3), np.uint8), [0, 1], {"class_names": 5}, r"class_names must be a list of non-empty "
                                                                     r"strings\. Received: class_names=5"),
        (np.zeros((2, 3, 3), np.uint8), [0, 1], {"class_names": ["a", ""]}, r"Received: class_names=\['a', ''\]"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(x, y, kwargs, message):
    with pytest.raises(ValueError, match=message):
        from_arrays(x, y, **kwargs)


def test_subset_relabels_chosen_classes_and_caps_training_images_per_class():
    x = np.arange(60, dtype=np.uint8).reshape(60, 1, 1) * 4
    y = np.arange(60) % 3
    data = from_arrays(x, y, x_test=x[:9], y_test=y[:9], val_split=0.2, class_names=["a", "b", "c"])
    small = data.subset(classes=["c", "a"], per_class=5, val_per_class=2, seed=1)
    assert small.class_names == ["c", "a"]
    assert small.class_counts == {"train": [5, 5], "val": [2, 2], "test": [3, 3]}
    images, labels = small.arrays("train")
    original = dict(zip(data.arrays("train")[0].ravel().tolist(), data.arrays("train")[1].tolist(), strict=True))
    assert all(original[pixel] == {0: 2, 1: 0}[label] for pixel, label in zip(images.ravel().tolist(), labels.tolist(), strict=True))
    assert small.fingerprint != data.fingerprint
    again = data.subset(classes=["c", "a"], per_class=5, val_per_class=2, seed=1)
    np.testing.assert_array_equal(again.arrays("train")[0], images)


def test_subset_rejects_unknown_classes_and_bad_counts():
    data = from_arrays(np.zeros((10, 2, 2), np.uint8), np.arange(10) % 2, val_split=0)
    with pytest.raises(ValueError, match="unknown class 'z'"):
        data.subset(classes=["z"])
    with pytest.raises(ValueError, match=r"classes must name at least one class \(None keeps them all\)"):
        data.subset(classes=[])
    with pytest.raises(ValueError, match="per_class must be a positive integer"):
        data.subset(per_class=0)


def test_subset_refuses_a_label_index_that_is_another_class_s_name():
    names = sorted(str(n) for n in range(12))  # folders 0..11 sort as 0, 1, 10, 11, 2, ...
    data = from_arrays(np.zeros((24, 2, 2), np.uint8), np.arange(24) % 12, class_names=names, val_split=0)
    with pytest.raises(ValueError, match=r"class 2 is ambiguous: label index 2 is class '10', and another class is "
                                         r"named '2'; give the name as a string \('2', quoted in YAML\)"):
        data.subset(classes=[0, 1, 2])
    assert data.subset(classes=["0", "1", "2"]).class_names == ["0", "1", "2"]
    assert data.subset(classes=[0, 1]).class_names == ["0", "1"]  # index and name agree


def test_subset_takes_a_single_name_or_index_as_one_class():
    data = from_arrays(np.zeros((22, 2, 2), np.uint8), np.arange(22) % 11, val_split=0)  # classes "0".."10"
    assert data.subset(classes="10").class_names == ["10"]
    assert data.subset(classes=np.int64(3)).class_names == ["3"]
    with pytest.raises(ValueError, match=r"unknown class '56'"):
        data.subset(classes="56")


def test_subset_accepts_numpy_integers_and_refuses_bools():
    data = from_arrays(np.zeros((12, 2, 2), np.uint8), np.arange(12) % 2, val_split=0.5)
    small = data.subset(per_class=np.int64(2), val_per_class=np.int32(1), seed=np.int64(1))
    assert small.class_counts == {"train": [2, 2], "val": [1, 1]}
    assert small.source.endswith(", 2 training images per class (seed 1)")
    assert small.fingerprint == data.subset(per_class=2, val_per_class=1, seed=1).fingerprint
    with pytest.raises(ValueError, match=r"per_class must be a positive integer or None. Received: per_class=True"):
        data.subset(per_class=True)
    with pytest.raises(ValueError, match=r"val_per_class must be a positive integer or None. Received: val_per_class=True"):
        data.subset(val_per_class=True)
    with pytest.raises(ValueError, match=r"seed must be a non-negative integer. Received: seed=True"):
        data.subset(seed=True)


def test_subset_keeps_the_skipped_list_of_its_source():
    data = from_arrays(np.zeros((4, 2, 2), np.uint8), np.arange(4) % 2, val_split=0)
    data.skipped = [("/data/a/bad.png", "empty file (0 bytes)")]
    small = data.subset(classes=["1"])
    assert small.skipped == data.skipped and small.skipped is not data.skipped
    assert small.skipped_csv() == "path,reason\n/data/a/bad.png,empty file (0 bytes)\n"

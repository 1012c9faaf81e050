"""Tests of from_folder: listing, decoding with PIL, skipped files, splits, errors."""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cnnkit.data import from_folder


def save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path, **kwargs)
    return path


def solid(h, w, rgb):
    return np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3))


def make_tree(root, counts, size=(6, 8)):
    """Class folders of solid-colour PNGs whose red channel encodes (class, index)."""
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            save(root / name / f"img{i:03d}.png", solid(*size, (10 * c + i, 50, 100)))
    return root


def ids(images):
    return images[:, 0, 0, 0].tolist()  # red channel of the top-left pixel


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "train", {"dog": 5, "cat": 4})


# --- listing, decoding -------------------------------------------------------------------------


def test_classes_sorted_shapes_dtypes_and_pixels(tree):
    data = from_folder(tree, image_size=(6, 8), val_split=0)
    assert data.class_names == ["cat", "dog"]
    assert data.image_shape == (6, 8, 3)
    image_spec, label_spec = data.train.element_spec
    assert image_spec.shape == (6, 8, 3) and image_spec.dtype == tf.uint8
    assert label_spec.shape == () and label_spec.dtype == tf.int32
    assert data.class_counts == {"train": [4, 5]}
    images, labels = data.arrays("train")
    assert images.dtype == np.uint8 and images.shape == (9, 6, 8, 3)
    # cat (label 0, written as class index 1 -> red 10+i), dog (red 0+i); stored in a seeded random order
    assert sorted(zip(labels.tolist(), ids(images))) == [(0, 10), (0, 11), (0, 12), (0, 13), (1, 0), (1, 1), (1, 2),
                                                         (1, 3), (1, 4)]
    images, labels = from_folder(tree, image_size=(6, 8), val_split=0, shuffle=False).arrays("train")
    assert ids(images) == [10, 11, 12, 13, 0, 1, 2, 3, 4]  # shuffle=False: class by class, files sorted
    assert labels.tolist() == [0] * 4 + [1] * 5
    assert (images[..., 1] == 50).all() and (images[..., 2] == 100).all()
    assert data.source == f"folder {tree.resolve()}"
    assert data.skipped == []


def test_resize_to_image_size_bilinear(tmp_path):
    left_right = np.zeros((10, 20, 3), np.uint8)
    left_right[:, 10:] = 200
    save(tmp_path / "a" / "x.png", left_right)
    save(tmp_path / "b" / "y.png", solid(3, 7, (9, 9, 9)))
    data = from_folder(tmp_path, image_size=(5, 4), val_split=0)
    images, _ = data.arrays("train")
    assert images.shape == (2, 5, 4, 3)
    expected = np.asarray(Image.fromarray(left_right).resize((4, 5), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(images[0], expected)
    assert images[0, :, 0].max() == 0 and images[0, :, -1].min() == 200
    assert (images[1] == 9).all()


def test_grayscale_mode_converts_rgb_with_pil_luma(tmp_path):
    save(tmp_path / "red" / "r.png", solid(4, 4, (255, 0, 0)))
    save(tmp_path / "gray" / "g.png", np.full((4, 4), 100, np.uint8))  # mode L
    data = from_folder(tmp_path, image_size=(4, 4), color_mode="grayscale", val_split=0)
    assert data.image_shape == (4, 4, 1)
    assert data.train.element_spec[0].shape == (4, 4, 1)
    images, labels = data.arrays("train")
    assert images.shape == (2, 4, 4, 1)
    assert labels.tolist() == [0, 1]  # "gray", "red"
    assert (images[0] == 100).all()
    assert (images[1] == 76).all()  # PIL L = 0.299 R + 0.587 G + 0.114 B


def test_rgb_mode_expands_grayscale_palette_and_composites_alpha_on_white(tmp_path):
    save(tmp_path / "a" / "gray.png", np.full((3, 3), 100, np.uint8))
    rgba = np.zeros((3, 3, 4), np.uint8)
    rgba[...] = (10, 20, 30, 0)
    save(tmp_path / "b" / "rgba.png", rgba)
    palette = Image.fromarray(solid(3, 3, (200, 0, 0)).copy()).convert(
        "P", palette=Image.Palette.ADAPTIVE
    )
    palette.save(tmp_path / "b" / "pal.gif")
    assert Image.open(tmp_path / "b" / "pal.gif").mode == "P"
    data = from_folder(tmp_path, image_size=(3, 3), val_split=0, shuffle=False)
    images, _ = data.arrays("train")
    assert images.shape == (3, 3, 3, 3)
    assert (images[0] == 100).all()
    assert (images[1, ..., 0] == 200).all()  # b/pal.gif sorts before b/rgba.png
    assert (images[2] == 255).all()  # fully transparent: the white background, not (10, 20, 30)


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((8, 16, 3), np.uint8)  # H=8, W=16: left half red, right half blue
    stored[:, :8] = (255, 0, 0)
    stored[:, 8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    save(tmp_path / "rotated" / "a.jpg", stored, exif=exif, quality=95)
    save(tmp_path / "upright" / "b.jpg", stored, quality=95)
    data = from_folder(tmp_path, image_size=(16, 8), val_split=0)
    rotated, upright = data.arrays("train")[0]
    # displayed upright: the left (red) half becomes the top half
    assert rotated[2, 4, 0] > 200 and rotated[2, 4, 2] < 50
    assert rotated[13, 4, 2] > 200 and rotated[13, 4, 0] < 50
    # without the tag the same pixels are squashed, not rotated: red stays on the left
    assert upright[13, 1, 0] > 200 and upright[2, 6, 2] > 200


def test_extensions_case_insensitive_recursive_and_other_files_ignored(tmp_path):
    save(tmp_path / "a" / "one.PNG", solid(2, 2, (1, 1, 1)))
    save(tmp_path / "a" / "sub" / "two.JpG", solid(2, 2, (2, 2, 2)))
    save(tmp_path / "a" / "three.bmp", solid(2, 2, (3, 3, 3)))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    save(tmp_path / "a" / ".hidden.png", solid(2, 2, (4, 4, 4)))
    save(tmp_path / ".cache" / "x.png", solid(2, 2, (5, 5, 5)))
    (tmp_path / "README.md").write_text("top-level files are not classes")
    data = from_folder(tmp_path, image_size=(2, 2), val_split=0)
    assert data.class_names == ["a"]
    assert data.sizes == {"train": 3}
    assert data.skipped == []
    data = from_folder(tmp_path, image_size=2, val_split=0, extensions=(".bmp",))
    assert data.sizes == {"train": 1}


# --- unreadable files --------------------------------------------------------------------------


def test_unreadable_files_are_skipped_with_a_warning_and_recorded(tree):
    good = (tree / "cat" / "img000.png").read_bytes()
    corrupt = tree / "cat" / "corrupt.png"
    corrupt.write_bytes(good[:8] + b"\x00" * 40)  # PNG signature, then a broken IHDR chunk
    text = tree / "dog" / "text.png"
    text.write_text("this is a text file named .png\n")
    with pytest.warns(UserWarning, match="skipped 2 file") as record:
        data = from_folder(tree, image_size=(6, 8), val_split=0)
    message = str(record[0].message)
    assert str(corrupt) in message and str(text) in message
    assert [p for p, _ in data.skipped] == [str(corrupt), str(text)]
    assert all(reason for _, reason in data.skipped)
    assert "cannot identify image file" in data.skipped[1][1]
    assert data.class_counts == {"train": [4, 5]}
    assert "skipped: 2 unreadable" in data.summary()
    assert len(data.arrays("train")[0]) == 9


def test_symlinked_subfolders_are_followed_once_and_unreadable_ones_recorded(tree, tmp_path, monkeypatch):
    more = make_tree(tmp_path / "elsewhere", {"m": 3}) / "m"
    (tree / "cat" / "more").symlink_to(more, target_is_directory=True)  # followed: 3 more cats
    (tree / "cat" / "more" / "loop").symlink_to(tree / "cat", target_is_directory=True)  # back up: listed once
    (tree / "dog" / "locked").mkdir()
    save(tree / "dog" / "locked" / "hidden.png", solid(6, 8, (0, 0, 0)))
    scandir = os.scandir

    def denied(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)  # root reads any folder: refuse this one as a user's mode 000 would
    with pytest.warns(UserWarning, match="skipped 2 file"):
        data = from_folder(tree, image_size=(6, 8), val_split=0)
    assert data.class_counts == {"train": [7, 5]}
    assert data.skipped == [
        (str(tree / "cat" / "more" / "loop"), f"a second way into the folder {tree.resolve() / 'cat'}, listed once (a symlink)"),
        (str(tree / "dog" / "locked"), "cannot read the folder: Permission denied"),
    ]


def test_a_symlink_into_another_class_s_folder_is_listed_once_under_that_class(tree):
    (tree / "cat" / "more").symlink_to(tree / "dog", target_is_directory=True)  # sorts before dog: would label dogs cat
    (tree / "dog" / "also").symlink_to(tree / "cat" / "more", target_is_directory=True)  # into dog itself, via cat
    with pytest.warns(UserWarning, match="skipped 2 file"):
        data = from_folder(tree, image_size=(6, 8), val_split=0, shuffle=False)
    assert data.class_counts == {"train": [4, 5]}
    images, labels = data.arrays("train")
    assert list(zip(labels.tolist(), ids(images))) == [(0, 10), (0, 11), (0, 12), (0, 13), (1, 0), (1, 1), (1, 2),
                                                       (1, 3), (1, 4)]
    dog = tree.resolve() / "dog"
    assert data.skipped == [
        (str(tree / "cat" / "more"), f"a second way into the folder {dog}, listed once (a symlink)"),
        (str(tree / "dog" / "also"), f"a second way into the folder {dog}, listed once (a symlink)"),
    ]


@pytest.mark.parametrize("target", ["cat", "cat/sub"])
def test_a_class_folder_that_is_another_name_for_a_class_folder_is_refused_naming_both(tree, target):
    save(tree / "cat" / "sub" / "x.png", solid(6, 8, (0, 0, 0)))
    (tree / "a_kitty").symlink_to(tree / target, target_is_directory=True)  # sorts first: still not the class
    with pytest.raises(ValueError, match=f"Class folder {tree / 'a_kitty'} cannot be listed: another name for the "
                                         rf"class folder {tree / 'cat'} \(a symlink to {tree.resolve() / target}\), "
                                         f"not a class of its own. Received: path='{tree}'"):
        from_folder(tree, image_size=(6, 8), val_split=0)


def test_a_class_folder_that_is_a_broken_symlink_is_refused_naming_it(tree, tmp_path):
    (tree / "bee").symlink_to(tmp_path / "unmounted" / "bee", target_is_directory=True)
    with pytest.raises(ValueError, match=rf"Class folder {tree / 'bee'} cannot be listed: a broken symlink \(to "
                                         rf"{tmp_path / 'unmounted' / 'bee'}\), not a folder that can be listed"):
        from_folder(tree, image_size=(6, 8), val_split=0)


def test_a_folder_of_splits_given_as_the_class_folder_is_warned_about(tmp_path):
    make_tree(tmp_path / "pets" / "train", {"cat": 2, "dog": 2})
    make_tree(tmp_path / "pets" / "val", {"cat": 1, "dog": 1})
    with pytest.warns(UserWarning, match=r"the class subfolders of .*pets are \['train', 'val'\]: that looks like a "
                                         r"dataset's splits, not its classes; give path='.*pets/train'"):
        data = from_folder(tmp_path / "pets", image_size=(6, 8), val_split=0)
    assert data.class_names == ["train", "val"]  # still read as asked


def test_file_broken_after_scan_fails_loudly_naming_it(tree):
    data = from_folder(tree, image_size=(6, 8), val_split=0)
    broken = tree / "dog" / "img002.png"
    broken.write_bytes(broken.read_bytes()[:40])  # header intact, pixel data truncated
    with pytest.raises(tf.errors.OpError, match="img002.png"):
        data.arrays("train")


# --- splits ----------------------------------------------------------------------------------------


def test_val_split_is_stratified_and_seeded(tmp_path):
    root = make_tree(tmp_path, {"a": 10, "b": 5}, size=(2, 2))
    data = from_folder(root, image_size=(2, 2), val_split=0.2, seed=0)
    assert data.class_counts == {"train": [8, 4], "val": [2, 1]}
    assert data.sizes == {"train": 12, "val": 3}
    train_ids, val_ids = ids(data.arrays("train")[0]), ids(data.arrays("val")[0])
    assert sorted(train_ids + val_ids) == list(range(10)) + list(range(10, 15))
    again = from_folder(root, image_size=(2, 2), val_split=0.2, seed=0)
    assert ids(again.arrays("val")[0]) == val_ids
    other = from_folder(root, image_size=(2, 2), val_split=0.2, seed=1)
    assert ids(other.arrays("val")[0]) != val_ids
    assert other.fingerprint != data.fingerprint  # same files, another training set
    assert again.fingerprint == data.fingerprint


def test_training_split_is_stored_in_a_seeded_random_order_not_class_by_class(tmp_path):
    root = make_tree(tmp_path, {"a": 12, "b": 12, "c": 12}, size=(2, 2))
    labels = from_folder(root, image_size=(2, 2), val_split=0, seed=0).arrays("train")[1].tolist()
    assert sorted(labels) == [0] * 12 + [1] * 12 + [2] * 12
    assert set(labels[:12]) == {0, 1, 2}  # the head of the split already holds every class
    assert from_folder(root, image_size=(2, 2), val_split=0, seed=0).arrays("train")[1].tolist() == labels
    assert from_folder(root, image_size=(2, 2), val_split=0, seed=1).arrays("train")[1].tolist() != labels


def test_test_path_with_matching_classes(tmp_path):
    train = make_tree(tmp_path / "train", {"x": 3, "y": 3}, size=(2, 2))
    test = make_tree(tmp_path / "test", {"x": 1, "y": 2}, size=(2, 2))
    data = from_folder(train, image_size=(2, 2), val_split=0, test_path=test)
    assert data.class_counts == {"train": [3, 3], "test": [1, 2]}
    images, labels = data.arrays("test")
    assert ids(images) == [0, 10, 11] and labels.tolist() == [0, 1, 1]
    assert str(test.resolve()) in data.source
    without = from_folder(train, image_size=(2, 2), val_split=0)
    assert without.fingerprint != data.fingerprint


def test_test_path_with_other_classes_names_both(tmp_path):
    train = make_tree(tmp_path / "train", {"x": 2, "y": 2}, size=(2, 2))
    test = make_tree(tmp_path / "test", {"x": 1, "z": 1}, size=(2, 2))
    with pytest.raises(ValueError, match="must match") as info:
        from_folder(train, image_size=(2, 2), test_path=test)
    assert str(train.resolve()) in str(info.value) and str(test.resolve()) in str(info.value)
    assert "['x', 'z']" in str(info.value)


@pytest.mark.parametrize("test", ["train", "train/cat", "."])
def test_test_path_that_is_the_train_folder_or_nested_with_it_is_refused(tree, tmp_path, test):
    where = "the train folder" if test == "train" else "nested with the train folder"
    with pytest.raises(ValueError, match=f"The test folder {(tmp_path / test).resolve()} is {where} {tree}: every "
                                         "test image would also be a training image"):
        from_folder(tree, image_size=(6, 8), test_path=tmp_path / test)


# --- fingerprint -------------------------------------------------------------------------------------


def test_fingerprint_stable_location_independent_and_sensitive_to_content_and_options(tmp_path):
    root = make_tree(tmp_path / "one", {"a": 2, "b": 2}, size=(2, 2))
    fp = from_folder(root, image_size=(2, 2)).fingerprint
    assert len(fp) == 64
    assert from_folder(root, image_size=(2, 2)).fingerprint == fp
    copy = shutil.copytree(root, tmp_path / "two")
    assert from_folder(copy, image_size=(2, 2)).fingerprint == fp
    # the same files decoded or split otherwise are other training data
    others = [from_folder(copy, image_size=(4, 4)), from_folder(copy, image_size=(2, 2), color_mode="grayscale"),
              from_folder(copy, image_size=(2, 2), val_split=0.5), from_folder(copy, image_size=(2, 2), seed=1),
              from_folder(copy, image_size=(2, 2), shuffle=False)]
    assert len({fp, *(data.fingerprint for data in others)}) == 1 + len(others)
    save(copy / "b" / "extra.png", solid(2, 2, (0, 0, 0)))
    assert from_folder(copy, image_size=(2, 2)).fingerprint != fp
    (copy / "b" / "extra.png").unlink()
    (copy / "a" / "img000.png").rename(copy / "a" / "renamed.png")
    assert from_folder(copy, image_size=(2, 2)).fingerprint != fp


# --- errors --------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(ValueError, match=r"Folder not found: .*nope"):
        from_folder(tmp_path / "nope", image_size=(2, 2))


@pytest.mark.parametrize("blank", ["", "  "])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch, blank):
    monkeypatch.chdir(make_tree(tmp_path / "train", {"a": 1, "b": 1}))  # a usable folder of classes
    with pytest.raises(ValueError, match=f"^path is empty: expected a folder path. Received: path='{blank}'$"):
        from_folder(blank, image_size=(2, 2))
    with pytest.raises(ValueError, match=f"^test_path is empty: expected a folder path. Received: test_path='{blank}'"):
        from_folder(tmp_path / "train", image_size=(2, 2), test_path=blank)


def test_path_is_a_file(tmp_path):
    file = save(tmp_path / "x.png", solid(2, 2, (0, 0, 0)))
    with pytest.raises(ValueError, match="Not a folder"):
        from_folder(file, image_size=(2, 2))


def test_empty_folder_and_folder_without_subfolders(tmp_path):
    with pytest.raises(ValueError, match=f"No class subfolders in {tmp_path}"):
        from_folder(tmp_path, image_size=(2, 2))
    save(tmp_path / "loose.png", solid(2, 2, (0, 0, 0)))
    with pytest.raises(ValueError, match="No class subfolders"):
        from_folder(tmp_path, image_size=(2, 2))


def test_class_without_images_names_its_folder(tmp_path):
    make_tree(tmp_path, {"a": 2}, size=(2, 2))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(
        ValueError, match=f"Class folder {tmp_path / 'empty'} has no readable images"
    ):
        from_folder(tmp_path, image_size=(2, 2))


def test_class_whose_only_file_is_unreadable(tmp_path):
    make_tree(tmp_path, {"a": 2}, size=(2, 2))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "fake.jpg").write_text("text")
    with pytest.raises(ValueError, match="Class folder .*b has no readable images") as info:
        from_folder(tmp_path, image_size=(2, 2))
    assert "1 file(s) were skipped" in str(info.value)
    assert "fake.jpg" in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": (0, 4)}, r"Received: image_size=\(0, 4\)"),
        ({"image_size": (4, 4, 3)}, r"Received: image_size=\(4, 4, 3\)"),
        ({"image_size": "big"}, r"Received: image_size='big'"),
        ({"image_size": (4, 4), "color_mode": "rgba"}, r"Received: color_mode='rgba'"),
        ({"image_size": (4, 4), "val_split": 1}, r"Received: val_split=1"),
        ({"image_size": (4, 4), "seed": 1.5}, r"Received: seed=1\.5"),
        ({"image_size": (4, 4), "extensions": ()}, r"Received: extensions=\(\)"),
        ({"image_size": (4, 4), "test_path": 3}, r"Received: test_path=3"),
    ],
)
def test_bad_arguments(tree, kwargs, message):
    with pytest.raises(ValueError, match=message):
        from_folder(tree, **kwargs)

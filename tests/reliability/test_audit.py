"""Guarantee 6: `cnnkit.data.audit` / `cnnkit data audit` report per-class counts, unusable files,
exact duplicates within a class, across classes (conflicting labels) and across train/test
(leakage), with exit status 0 clean, 1 problems found, 2 usage error."""

import json
import os
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

import cnnkit
from cnnkit.cli import main
from cnnkit.data import AuditReport, audit


def image(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def copy(source, target):
    target.parent.mkdir(parents=True, exist_ok=True)
    return shutil.copyfile(source, target)


@pytest.fixture
def clean(tmp_path):
    train, test = tmp_path / "train", tmp_path / "test"
    for seed, name in enumerate(["cat/a.png", "cat/b.png", "dog/c.png"]):
        image(train / name, seed)
    image(test / "cat" / "x.png", 10)
    image(test / "dog" / "y.png", 11)
    return train, test


@pytest.fixture
def dirty(tmp_path):
    """Train/test folders with one problem of each kind."""
    train, test = tmp_path / "train", tmp_path / "test"
    a = image(train / "cat" / "a.png", 1)
    copy(a, train / "cat" / "sub" / "a_copy.png")  # duplicate within a class
    c = image(train / "cat" / "c.png", 2)
    copy(c, train / "dog" / "e.png")  # the same bytes labelled cat and dog
    d = image(train / "dog" / "d.png", 3)
    copy(d, test / "dog" / "d_again.png")  # train/test leak
    image(test / "cat" / "h.png", 4)
    (train / "cat" / "empty.png").write_bytes(b"")
    (train / "dog" / "broken.png").write_bytes(a.read_bytes()[:60])  # truncated PNG
    return train, test


def test_clean_folders(clean):
    train, test = clean
    report = audit(train, test_path=test)
    assert isinstance(report, AuditReport)
    assert report.clean and report.problems == [] and report.duplicates == []
    assert report.class_names == ["cat", "dog"]
    assert report.class_counts == {"train": {"cat": 2, "dog": 1}, "test": {"cat": 1, "dog": 1}}
    assert report.path == str(train.resolve()) and report.test_path == str(test.resolve())
    assert str(report).splitlines()[-1] == "result: clean, no problems found"


def test_counts_skipped_and_every_kind_of_duplicate(dirty):
    train, test = dirty
    report = audit(train, test_path=test)
    assert report.class_counts == {"train": {"cat": 3, "dog": 2}, "test": {"cat": 1, "dog": 1}}
    assert [path for path, _ in report.skipped] == [str(train / "cat" / "empty.png"),
                                                    str(train / "dog" / "broken.png")]
    assert "empty file" in report.skipped[0][1] and "truncated" in report.skipped[1][1]

    def names(groups):
        return [sorted(f"{f.split}:{f.class_name}:{f.path.rsplit('/', 1)[1]}" for f in g.files) for g in groups]

    assert names(report.within_class) == [["train:cat:a.png", "train:cat:a_copy.png"]]
    assert names(report.conflicting_labels) == [["train:cat:c.png", "train:dog:e.png"]]
    assert names(report.train_test_leaks) == [["test:dog:d_again.png", "train:dog:d.png"]]
    assert len(report.duplicates) == 3
    assert all(len(group.sha256) == 64 for group in report.duplicates)
    assert not report.clean
    assert report.problems == [
        "2 file(s) or folder(s) skipped (cannot be used)",
        "1 image(s) duplicated within a class",
        "1 image(s) duplicated across classes (conflicting labels)",
        "1 image(s) in both train and test (leakage)",
    ]


def test_skipped_files_are_what_from_folder_skips(dirty):
    train, test = dirty
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = cnnkit.data.from_folder(train, image_size=6, test_path=test, val_split=0)
    assert audit(train, test_path=test).skipped == data.skipped


def test_readable_str_and_plain_to_dict(dirty):
    train, test = dirty
    report = audit(train, test_path=test)
    text = str(report)
    assert text.splitlines()[0] == f"Audit of {train.resolve()} (test: {test.resolve()})"
    assert "  class   train    test" in text
    assert "  cat         3       1" in text and "  total       5       2" in text
    assert f"{train.resolve() / 'cat' / 'empty.png'}: empty file (0 bytes)" in text
    assert "    train:cat/a.png = train:cat/sub/a_copy.png" in text
    assert "    train:cat/c.png = train:dog/e.png" in text
    assert "    train:dog/d.png = test:dog/d_again.png" in text
    assert "result: 4 problem(s):" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["clean"] is False and len(data["problems"]) == 4
    assert data["class_counts"]["train"] == {"cat": 3, "dog": 2}
    assert data["skipped"][0] == {"path": str(train.resolve() / "cat" / "empty.png"), "reason": "empty file (0 bytes)"}
    leak = [group for group in data["duplicates"] if group["train_test_leak"]]
    assert len(leak) == 1 and not leak[0]["within_class"] and not leak[0]["conflicting_labels"]
    assert {file["split"] for file in leak[0]["files"]} == {"train", "test"}
    assert set(leak[0]["files"][0]) == {"split", "class_name", "path"}


def test_classes_that_differ_or_are_empty_are_reported_not_raised(clean):
    train, test = clean
    image(test / "bird" / "z.png", 20)
    (train / "fish").mkdir()
    (train / "fish" / "notes.txt").write_text("no images")
    report = audit(train, test_path=test)
    assert report.class_names == ["bird", "cat", "dog", "fish"]
    assert report.class_counts["train"] == {"bird": 0, "cat": 2, "dog": 1, "fish": 0}
    assert report.class_counts["test"] == {"bird": 1, "cat": 1, "dog": 1, "fish": 0}
    assert report.problems == [
        "2 class(es) without usable images in train: bird, fish",
        "1 class(es) without usable images in test: fish",
    ]


def test_one_class_is_a_problem_and_training_on_it_says_so(tmp_path):
    image(tmp_path / "only" / "a.png", 10)
    image(tmp_path / "only" / "b.png", 200)
    assert audit(tmp_path).problems == ["1 class (only): a classifier needs at least 2 class subfolders"]
    with pytest.raises(ValueError, match=r"the data \(.*\) has 1 class \('only'\); a classifier needs at least 2"):
        cnnkit.recipes.train("FC4", {"path": str(tmp_path), "image_size": [8, 8], "val_split": 0}, epochs=1,
                             run_dir=tmp_path.parent / "run", verbose=0)
    assert not (tmp_path.parent / "run").exists()


def test_audit_without_test_folder(dirty):
    train, _ = dirty
    report = audit(train)
    assert report.test_path is None and list(report.class_counts) == ["train"]
    assert report.train_test_leaks == [] and len(report.duplicates) == 2
    assert "(test:" not in str(report).splitlines()[0]


def test_cli_clean_exits_0(clean, capsys):
    train, test = clean
    assert main(["data", "audit", str(train), "--test-path", str(test)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Audit of {train.resolve()}") and "result: clean" in out


def test_cli_problems_exit_1_with_the_report(dirty, capsys):
    train, test = dirty
    assert main(["data", "audit", str(train), "--test-path", str(test)]) == 1
    captured = capsys.readouterr()
    assert "train/test leakage: 1" in captured.out and "result: 4 problem(s):" in captured.out
    assert captured.err == ""


def test_cli_json(dirty, capsys):
    train, test = dirty
    assert main(["data", "audit", str(train), "--test-path", str(test), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["clean"] is False and len(data["duplicates"]) == 3 and len(data["skipped"]) == 2


def test_cli_missing_folder_exits_2_with_one_line(tmp_path, capsys):
    assert main(["data", "audit", str(tmp_path / "nope")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"cnnkit: error: Folder not found: {tmp_path / 'nope'}. Received: path='{tmp_path / 'nope'}'\n"
    assert main(["data", "audit", str(tmp_path)]) == 2  # a folder without class subfolders
    assert capsys.readouterr().err.startswith("cnnkit: error: No class subfolders in")
    assert main(["data"]) == 2  # no action: argparse usage error


@pytest.mark.parametrize("test", ["train", "train/cat"])
def test_a_test_folder_that_is_the_train_folder_or_inside_it_is_refused(clean, test):
    train = clean[0]
    test_path = train.parent / test
    where = "the train folder" if test == "train" else "nested with the train folder"
    with pytest.raises(ValueError, match=f"The test folder {test_path.resolve()} is {where} {train.resolve()}"):
        audit(train, test_path=test_path)


def test_cli_prints_a_file_name_that_is_not_utf8_escaped_and_json_keeps_it(clean, capsys):
    train, _ = clean
    name = os.fsdecode(b"caf\xe9.png")  # a Latin-1 file name: 'caf\udce9.png', a lone surrogate
    copy(train / "cat" / "a.png", train / "cat" / name)
    assert main(["data", "audit", str(train)]) == 1
    out = capsys.readouterr().out
    out.encode("utf-8")  # printable on a UTF-8 stdout (a lone surrogate raises here)
    assert "    train:cat/a.png = train:cat/caf\\xe9.png\n" in out
    assert main(["data", "audit", str(train), "--json"]) == 1
    files = json.loads(capsys.readouterr().out)["duplicates"][0]["files"]
    assert [file["path"] for file in files] == [str(train.resolve() / "cat" / file) for file in ("a.png", name)]


def test_files_left_out_by_their_extension_are_counted_and_images_among_them_are_a_problem(clean, capsys):
    train, _ = clean
    Image.open(train / "cat" / "a.png").save(train / "cat" / "a.webp")
    (train / "dog" / "sub").mkdir()
    Image.open(train / "dog" / "c.png").save(train / "dog" / "sub" / "c.TIF", format="TIFF")
    (train / "dog" / "notes.txt").write_text("not an image")
    (train / "dog" / "README").write_text("not an image")
    report = audit(train)
    assert report.class_counts == {"train": {"cat": 2, "dog": 1}}
    assert report.left_out == {"": 1, ".tif": 1, ".txt": 1, ".webp": 1}
    problem = "2 image file(s) left out by their extension (.tif 1, .webp 1): add their extension to extensions= " \
              "(--extensions) to use them"
    assert report.problems == [problem] and report.to_dict()["left_out"] == report.left_out
    assert "files left out by their extension: 4\n  (none): 1\n  .tif: 1\n  .txt: 1\n  .webp: 1\n" in str(report)
    assert audit(train, extensions=(".png", ".webp", ".tif")).class_counts == {"train": {"cat": 3, "dog": 2}}
    assert main(["data", "audit", str(train), "--extensions", ".png, .webp,.tif", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["class_counts"] == {"train": {"cat": 3, "dog": 2}} and data["left_out"] == {"": 1, ".txt": 1}
    assert main(["data", "audit", str(train), "--extensions", ".png", "--max-pixels", "35"]) == 1  # 6 x 6 > 35
    out = capsys.readouterr().out
    assert f"{train.resolve() / 'cat' / 'a.png'}: too many pixels, possible decompression bomb: 6x6 = 36 > " \
           "max_pixels=35 (judged from the header; nothing decoded)\n" in out
    assert main(["data", "audit", str(train), "--extensions", ""]) == 2
    assert capsys.readouterr().err == ("cnnkit: error: extensions must be a non-empty sequence of file endings such "
                                      "as '.png'. Received: extensions=('',)\n")
    assert main(["data", "audit", str(train), "--max-pixels", "0"]) == 2
    assert "--max-pixels: expected a positive integer. Received: '0'" in capsys.readouterr().err


@pytest.mark.parametrize("args", [[""], ["  "], ["{train}", "--test-path", ""]])
def test_cli_an_empty_path_is_refused_not_read_as_the_current_folder(clean, monkeypatch, capsys, args):
    train, _ = clean
    monkeypatch.chdir(train)  # a folder of classes, which an empty path used to audit
    args = [arg.format(train=train) for arg in args]
    name = "test_path" if "--test-path" in args else "path"
    assert main(["data", "audit", *args]) == 2
    message = f"{name} is empty: expected a folder path. Received: {name}={args[-1]!r}"
    assert capsys.readouterr().err == f"cnnkit: error: {message}\n"

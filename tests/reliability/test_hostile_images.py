"""Guarantee 5: `from_folder` on a folder of hostile files never crashes, converts what it can
the documented way, and lists every file it leaves out with the reason.

Every hostile file is made here with PIL (or by hand: the PNG decompression bombs are valid
1-bit PNGs written chunk by chunk, a few KB that decode to 100 and 400 million pixels).
"""

import csv
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageFile

import cnnkit
from cnnkit.data import MAX_IMAGE_PIXELS, from_folder

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def save(path, image, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image.save(path, **kwargs)
    return path


def solid(h, w, rgb):
    return np.ascontiguousarray(np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3)))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(path, side):
    """A valid black 1-bit PNG of side x side pixels: a few KB on disk, 3 * side**2 bytes as RGB."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    block = row * 1000
    idat = b"".join(compressor.compress(block) for _ in range(side // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat)
                     + png_chunk(b"IEND", b""))
    return path


def truncated(path, image, fmt, **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # header intact, data cut
    return path


def noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def build_hostile(root):
    """Train and test folders; returns (train, test, decodable names in load order, skipped {path: words})."""
    train, test = root / "train", root / "test"
    for i, colour in enumerate([(10, 10, 10), (20, 20, 20), (30, 30, 30)]):
        save(train / "a_plain" / f"ok{i}.png", solid(8, 4, colour))
    hostile = train / "b_hostile"
    # 16-bit grayscale PNG (mode I;16): left column 65535, next 32896, then 257, then 0
    gray16 = np.array([[65535, 32896, 257, 0]] * 8, np.uint16)
    save(hostile / "01_gray16.png", Image.fromarray(gray16))
    assert Image.open(hostile / "01_gray16.png").mode == "I;16"
    # 16-bit PGM (opens as mode I) named .png: the format comes from the content
    (hostile / "02_pgm16_named.png").write_bytes(
        b"P2\n4 8\n65535\n" + b"65535 32896 257 0\n" * 8
    )
    assert Image.open(hostile / "02_pgm16_named.png").mode == "I"
    Image.new("CMYK", (4, 8), (0, 255, 255, 0)).save(hostile / "03_cmyk.jpg", quality=95)  # red
    rgba = np.zeros((8, 4, 4), np.uint8)
    rgba[:, 0] = (9, 9, 9, 0)  # fully transparent: white background
    rgba[:, 1] = (0, 0, 255, 255)  # opaque blue
    rgba[:, 2] = (200, 0, 0, 128)  # half transparent red over white
    rgba[:, 3] = (0, 0, 0, 255)  # opaque black
    save(hostile / "04_rgba.png", rgba)
    Image.fromarray(solid(8, 4, (0, 200, 0))).convert("P", palette=Image.Palette.ADAPTIVE).save(
        hostile / "05_palette.gif"
    )
    palette = Image.new("P", (4, 8), 0)
    palette.putpalette([0, 0, 0, 0, 0, 200] + [0] * 762)
    palette.paste(1, (2, 0, 4, 8))  # right half index 1 (blue), left half index 0 (transparent)
    palette.save(hostile / "06_palette_transparent.gif", transparency=0)
    stored = np.zeros((4, 8, 3), np.uint8)  # stored H=4, W=8: left half red, right half blue
    stored[:, :4], stored[:, 4:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: shown H=8, W=4, red on top
    save(hostile / "07_exif6.jpg", stored, exif=exif, quality=95)
    save(hostile / "08_png_named.jpg", solid(8, 4, (10, 20, 30)), format="PNG")
    decodable = [f"a_plain/ok{i}.png" for i in range(3)] + [
        "b_hostile/" + name
        for name in ("01_gray16.png", "02_pgm16_named.png", "03_cmyk.jpg", "04_rgba.png", "05_palette.gif",
                     "06_palette_transparent.gif", "07_exif6.jpg", "08_png_named.jpg")
    ]
    skipped = {
        truncated(hostile / "10_truncated.jpg", noise(64, 64), "JPEG", quality=90): "truncated",
        truncated(hostile / "11_truncated.png", noise(64, 64), "PNG"): "cannot decode",
        hostile / "12_empty.jpg": "empty file",
        hostile / "13_text.png": "cannot identify image file",
        png_bomb(hostile / "14_bomb.png", 10_000): "10000x10000 = 100,000,000 > max_pixels=89,478,485",
        png_bomb(hostile / "15_bomb_huge.png", 20_000): "decompression bomb",
    }
    (hostile / "12_empty.jpg").write_bytes(b"")
    (hostile / "13_text.png").write_text("this is a text file named .png\n")
    save(test / "a_plain" / "ok.png", solid(8, 4, (40, 40, 40)))
    save(test / "b_hostile" / "ok.jpg", solid(8, 4, (50, 50, 50)))
    skipped[truncated(test / "b_hostile" / "truncated.jpg", noise(32, 32, 1), "JPEG")] = "truncated"
    return train, test, decodable, {str(path): words for path, words in skipped.items()}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return build_hostile(tmp_path_factory.mktemp("hostile"))


def load(train, test, **kwargs):
    """from_folder, asserting one UserWarning and no PIL DecompressionBombWarning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = from_folder(train, image_size=(8, 4), test_path=test, **kwargs)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    messages = [str(w.message) for w in caught if "from_folder skipped" in str(w.message)]
    assert len(messages) == 1
    return data, messages[0]


def test_every_hostile_file_is_skipped_with_its_reason_and_nothing_crashes(hostile):
    train, test, decodable, expected = hostile
    data, message = load(train, test, val_split=0.25)
    assert dict(data.skipped).keys() == expected.keys()
    assert [path for path, _ in data.skipped] == sorted(expected, key=lambda p: (test.as_posix() in p, p))
    for path, reason in data.skipped:
        assert expected[path] in reason.lower(), (path, reason)
    assert "possible decompression bomb" in dict(data.skipped)[str(train / "b_hostile" / "14_bomb.png")]
    assert "skipped 7 file(s)" in message and "... and 2 more" in message
    assert str(train / "b_hostile" / "10_truncated.jpg") in message
    assert data.class_counts == {"train": [2, 6], "val": [1, 2], "test": [1, 1]}
    assert "skipped: 7 unreadable file(s)" in data.summary()
    for split in ("train", "val", "test"):  # iterating every split to the end raises nothing
        images, labels = data.arrays(split)
        assert images.shape == (sum(data.class_counts[split]), 8, 4, 3)


def test_decodable_files_are_converted_the_documented_way(hostile):
    train, test, decodable, _ = hostile
    data, _ = load(train, test, val_split=0, shuffle=False)  # in the sorted order of `decodable`
    images, labels = data.arrays("train")
    assert len(images) == len(decodable)
    image = dict(zip((name.split("/")[1] for name in decodable), images.astype(int)))
    # 16-bit: round(v / 257), not clipped at 255 (both the I;16 PNG and the mode-I PGM named .png)
    for name in ("01_gray16.png", "02_pgm16_named.png"):
        assert image[name][:, :, 0].tolist() == [[255, 128, 1, 0]] * 8, name
        assert (image[name][..., 0] == image[name][..., 2]).all()
    assert np.abs(image["03_cmyk.jpg"] - RED).max() <= 8  # CMYK (0, 255, 255, 0) is red
    rgba = image["04_rgba.png"]
    assert (rgba[:, 0] == WHITE).all()  # alpha 0: the white background, not the stored (9, 9, 9)
    assert (rgba[:, 1] == BLUE).all() and (rgba[:, 3] == 0).all()  # opaque pixels unchanged
    assert np.abs(rgba[:, 2] - (227, 127, 127)).max() <= 1  # 200 * 128/255 + 255 * 127/255 = 227
    assert (image["05_palette.gif"] == (0, 200, 0)).all()
    transparent = image["06_palette_transparent.gif"]
    assert (transparent[:, :2] == WHITE).all() and (transparent[:, 2:] == (0, 0, 200)).all()
    rotated = image["07_exif6.jpg"]  # displayed upright: the stored left (red) half is on top
    assert np.abs(rotated[:2] - RED).max() < 40 and np.abs(rotated[-2:] - BLUE).max() < 40
    assert (image["08_png_named.jpg"] == (10, 20, 30)).all()  # a PNG named .jpg is read as PNG
    assert labels.tolist() == [0, 0, 0] + [1] * 8


def test_a_hostile_folder_trains(hostile, tmp_path):
    train, test, _, _ = hostile
    data, _ = load(train, test, val_split=0.25)
    run = cnnkit.recipes.train("4C3-FC8", data, epochs=1, batch_size=4, run_dir=tmp_path / "run", verbose=0)
    assert np.isfinite(run.history["loss"]).all()
    assert run.metrics["num_examples"] == 2  # the test split's two usable images


def test_bomb_is_judged_from_the_header_with_the_default_limit(tmp_path, monkeypatch):
    save(tmp_path / "a" / "ok.png", solid(4, 4, (1, 2, 3)))
    bomb = png_bomb(tmp_path / "a" / "bomb.png", 10_000)  # 100M pixels: PIL itself only warns
    assert bomb.stat().st_size < 50_000 and MAX_IMAGE_PIXELS == 89_478_485
    loaded = []
    original = ImageFile.ImageFile.load

    def recording_load(self):
        loaded.append(self.filename)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    data, _ = load(tmp_path, None, val_split=0)
    assert str(bomb) not in loaded  # skipped from the header: never decoded
    assert str(tmp_path / "a" / "ok.png") in loaded  # verify=True decodes the others at scan
    assert data.skipped == [
        (str(bomb), "too many pixels, possible decompression bomb: 10000x10000 = 100,000,000 "
                    "> max_pixels=89,478,485 (judged from the header; nothing decoded)")
    ]


def test_max_pixels_argument(tmp_path):
    save(tmp_path / "a" / "small.png", solid(4, 4, (1, 1, 1)))
    save(tmp_path / "a" / "large.png", solid(20, 20, (2, 2, 2)))
    data, message = load(tmp_path, None, val_split=0, max_pixels=16 * 16)
    assert [path for path, _ in data.skipped] == [str(tmp_path / "a" / "large.png")]
    assert "20x20 = 400 > max_pixels=256" in data.skipped[0][1] and "large.png" in message
    assert data.sizes == {"train": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, no warning
        assert from_folder(tmp_path, image_size=4, val_split=0, max_pixels=400).sizes == {"train": 2}


def test_pil_limit_applies_when_lower_and_its_warning_and_error_do_not_leak(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # PIL warns above 300 pixels, refuses above 600
    save(tmp_path / "a" / "small.png", solid(10, 10, (1, 1, 1)))
    save(tmp_path / "a" / "warned.png", solid(20, 20, (2, 2, 2)))
    save(tmp_path / "a" / "refused.png", solid(30, 30, (3, 3, 3)))
    data, _ = load(tmp_path, None, val_split=0, max_pixels=10_000)  # asserts no PIL warning escaped
    reasons = dict(data.skipped)
    assert reasons.keys() == {str(tmp_path / "a" / "warned.png"), str(tmp_path / "a" / "refused.png")}
    assert "20x20 = 400 > PIL.Image.MAX_IMAGE_PIXELS=300" in reasons[str(tmp_path / "a" / "warned.png")]
    assert "possible decompression bomb" in reasons[str(tmp_path / "a" / "refused.png")]
    assert data.arrays("train")[0].shape == (1, 8, 4, 3)


@pytest.mark.parametrize("max_pixels", [0, -5, 1.5, True, "big", None])
def test_bad_max_pixels(tmp_path, max_pixels):
    save(tmp_path / "a" / "x.png", solid(2, 2, (0, 0, 0)))
    with pytest.raises(ValueError, match=r"Received: max_pixels="):
        from_folder(tmp_path, image_size=2, max_pixels=max_pixels)


def test_verify_false_reads_headers_only_and_fails_loudly_on_a_truncated_file(hostile):
    train, test, _, _ = hostile
    with pytest.warns(UserWarning, match=r"skipped 5 file\(s\)"):  # the truncated JPEGs pass the header
        data = from_folder(train, image_size=(8, 4), test_path=test, val_split=0, verify=False, shuffle=False)
    assert str(train / "b_hostile" / "10_truncated.jpg") not in dict(data.skipped)
    with pytest.raises(tf.errors.OpError, match="10_truncated.jpg"):
        data.arrays("train")
    with pytest.raises(ValueError, match=r"Received: verify='yes'"):
        from_folder(train, image_size=4, verify="yes")


def test_skipped_csv_is_plain_data_for_the_run_directory(hostile):
    train, test, _, _ = hostile
    data, _ = load(train, test, val_split=0)
    assert all(isinstance(p, str) and isinstance(r, str) for p, r in data.skipped)
    text = data.skipped_csv()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["path", "reason"]
    assert [tuple(row) for row in rows[1:]] == data.skipped  # commas in reasons are quoted
    assert cnnkit.data.from_arrays(np.zeros((2, 2, 2), np.uint8), [0, 1], val_split=0).skipped_csv() == "path,reason\n"

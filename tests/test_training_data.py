"""Training data: image loading, caption files, buckets, batches and the two dataset nodes."""

from __future__ import annotations

import inspect
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_finetune import host
from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.nodes import data as data_nodes
from comfy_finetune.nodes.data import (
    EXAMPLE_ROOT,
    TrainingData,
    TrainingDataFromImages,
    example_datasets,
    find_dataset_folder,
)
from comfy_finetune.training.data import (
    RawExample,
    TrainingSet,
    from_image_batch,
    load_image_file,
    make_buckets,
    prepare,
    read_caption,
    read_folder,
    to_rgb,
)


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def input_dir(tmp_path):
    """A fresh host input folder for one test; the previous one is restored afterwards."""
    old = host._settings.input_dir
    root = tmp_path / "input"
    root.mkdir()
    host.configure(input_dir=root)
    try:
        yield root
    finally:
        host._settings.input_dir = old


def solid(color, size=(16, 16), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def save(folder: Path, name: str, img: Image.Image | None = None, caption: str | bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    (img or solid((200, 50, 50))).save(path)
    if caption is not None:
        txt = path.with_suffix(".txt")
        txt.write_bytes(caption if isinstance(caption, bytes) else caption.encode("utf-8"))
    return path


def raw(size, caption="a thing", name="x.png", color=(120, 60, 30)) -> RawExample:
    return RawExample(solid(color, size), caption, name)


def rgb_at(img: Image.Image, xy) -> tuple[int, int, int]:
    return tuple(int(v) for v in img.getpixel(xy))


# ---------------------------------------------------------------------------------------------- loading
def test_exif_rotated_jpeg_loads_upright(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display rotated 90° clockwise
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    out = load_image_file(path)
    assert out.mode == "RGB" and out.size == (20, 40)
    top, bottom = rgb_at(out, (10, 5)), rgb_at(out, (10, 35))
    assert top[0] > 200 and top[2] < 60  # the stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_rgba_transparent_becomes_white(tmp_path):
    img = Image.new("RGBA", (4, 1), (255, 0, 0, 255))
    img.putpixel((1, 0), (0, 0, 0, 0))
    img.putpixel((2, 0), (0, 0, 0, 128))
    path = tmp_path / "alpha.png"
    img.save(path)
    out = load_image_file(path)
    assert out.mode == "RGB"
    assert rgb_at(out, (0, 0)) == (255, 0, 0)
    assert rgb_at(out, (1, 0)) == (255, 255, 255)
    assert all(120 <= v <= 135 for v in rgb_at(out, (2, 0)))  # half black over white


def test_la_and_palette_transparency(tmp_path):
    la = Image.new("LA", (2, 1), (0, 255))
    la.putpixel((1, 0), (0, 0))
    la.save(tmp_path / "la.png")
    out = load_image_file(tmp_path / "la.png")
    assert rgb_at(out, (0, 0)) == (0, 0, 0) and rgb_at(out, (1, 0)) == (255, 255, 255)

    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 0, 0, 10, 200, 10] + [0] * (256 * 3 - 6))
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    out = load_image_file(tmp_path / "pal.png")
    assert rgb_at(out, (0, 0)) == (255, 255, 255)  # the transparent index
    assert rgb_at(out, (1, 0)) == (10, 200, 10)

    pal.save(tmp_path / "pal.gif", transparency=0)
    assert rgb_at(load_image_file(tmp_path / "pal.gif"), (0, 0)) == (255, 255, 255)


def test_16bit_grey_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image_file(path))
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 4, 128, 255]  # 1000/257 ≈ 3.9, 32768/257 ≈ 127.5
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_other_modes_convert(tmp_path):
    as_int = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), "I")
    assert np.asarray(to_rgb(as_int))[0, :, 0].tolist() == [0, 255]
    small_int = Image.fromarray(np.array([[0, 200]], dtype=np.int32), "I")  # 8-bit data in an int image
    assert np.asarray(to_rgb(small_int))[0, :, 0].tolist() == [0, 200]
    as_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert np.asarray(to_rgb(as_float))[0, :, 0].tolist() == [0, 128, 255]
    assert rgb_at(to_rgb(Image.new("L", (1, 1), 77)), (0, 0)) == (77, 77, 77)
    assert rgb_at(to_rgb(Image.new("1", (1, 1), 1)), (0, 0)) == (255, 255, 255)

    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    cmyk.paste((0, 0, 0, 0), (4, 0, 8, 8))  # white
    cmyk.save(tmp_path / "cmyk.jpg", quality=95)
    out = load_image_file(tmp_path / "cmyk.jpg")
    red, white = rgb_at(out, (1, 4)), rgb_at(out, (6, 4))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    assert min(white) > 230


def test_max_short_side_shrinks_large_images(tmp_path):
    save(tmp_path, "big.jpg", solid((10, 200, 10), (400, 200)))
    save(tmp_path, "small.png", solid((10, 200, 10), (30, 20)))
    assert load_image_file(tmp_path / "big.jpg", max_short_side=50).size == (100, 50)
    assert load_image_file(tmp_path / "small.png", max_short_side=50).size == (30, 20)  # never enlarged


def test_corrupt_file_error_names_it(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(FinetuneError) as err:
        load_image_file(tmp_path / "broken.png")
    assert "broken.png" in str(err.value)
    assert err.value.node is None and err.value.input == "folder" and err.value.fix

    folder = tmp_path / "set"
    save(folder, "good.png", solid((1, 2, 3), (64, 64)))
    (folder / "truncated.png").write_bytes((folder / "good.png").read_bytes()[:60])
    with pytest.raises(FinetuneError, match="truncated.png"):
        read_folder(folder)


# ---------------------------------------------------------------------------------------------- folders
def test_empty_folder_error(tmp_path):
    folder = tmp_path / "empty_set"
    folder.mkdir()
    (folder / "notes.txt").write_text("captions without images")
    with pytest.raises(FinetuneError) as err:
        read_folder(folder)
    assert "empty_set" in str(err.value) and err.value.input == "folder" and err.value.fix
    with pytest.raises(FinetuneError, match="does not exist"):
        read_folder(tmp_path / "missing")


def test_captions_encodings_and_names(tmp_path):
    save(tmp_path, "a_bom.png", caption=b"\xef\xbb\xbfphoto of sks dog")
    save(tmp_path, "b_latin1.png", caption="un caf\u00e9 cr\u00e8me".encode("latin-1"))
    save(tmp_path, "c_chinese.png", caption="一只小狗在草地上")
    save(tmp_path, "小狗.png", caption="a dog, 狗")
    save(tmp_path, "d_space.png", caption="  a   dog\n\n on\tgrass \r\n")
    save(tmp_path, "e_none.png")
    save(tmp_path, "f_empty.png", caption="   \n")
    save(tmp_path, "g_utf16.png", caption="caf\u00e9 utf16".encode("utf-16"))
    got = {ex.name: ex.caption for ex in read_folder(tmp_path)}
    assert got == {
        "a_bom.png": "photo of sks dog",
        "b_latin1.png": "un café crème",
        "c_chinese.png": "一只小狗在草地上",
        "小狗.png": "a dog, 狗",
        "d_space.png": "a dog on grass",
        "e_none.png": None,
        "f_empty.png": None,
        "g_utf16.png": "café utf16",
    }
    assert read_caption(tmp_path / "a_bom.txt") == "photo of sks dog"


def test_folder_listing_rules(tmp_path):
    for name in ("b.PNG", "a.JpG", "c.webp", "d.bmp", "e.tiff", "f.gif", "g.jpeg", "h.tif"):
        save(tmp_path, name)
    (tmp_path / ".hidden.png").write_bytes(b"AppleDouble junk, not an image")
    (tmp_path / "readme.md").write_text("ignored")
    save(tmp_path / "not_repeats", "ignored.png")
    save(tmp_path, "upper.png")
    (tmp_path / "UPPER.TXT").write_text("caption found case-insensitively")
    examples = read_folder(tmp_path)
    assert [ex.name for ex in examples] == sorted(["a.JpG", "b.PNG", "c.webp", "d.bmp", "e.tiff", "f.gif", "g.jpeg",
                                                   "h.tif", "upper.png"])
    assert all(ex.image.mode == "RGB" and ex.repeats == 1 for ex in examples)
    assert examples[-1].caption == "caption found case-insensitively"


def test_kohya_repeat_folders(tmp_path):
    save(tmp_path / "3_dog", "one.png", caption="a dog")
    save(tmp_path / "1_cat", "two.png", caption="a cat")
    save(tmp_path / "0_skip", "three.png")
    examples = read_folder(tmp_path)
    assert [(ex.name, ex.repeats, ex.caption) for ex in examples] == [("1_cat/two.png", 1, "a cat"),
                                                                      ("3_dog/one.png", 3, "a dog")]
    ds = prepare(examples, resolution=16, repeats=2)
    assert ds.epoch_size == 2 * (1 + 3)
    first_epoch = [i for b in _take(ds.batches(2, seed=0), ds.steps_per_epoch(2)) for i in b.indices]
    assert sorted(first_epoch) == [0, 0] + [1] * 6


# ---------------------------------------------------------------------------------------------- prepare
def test_prepare_square_center_crop():
    img = Image.new("RGB", (48, 16), (255, 0, 0))
    img.paste((0, 255, 0), (16, 0, 32, 16))
    img.paste((0, 0, 255), (32, 0, 48, 16))
    ds = prepare([RawExample(img, "wide", "wide.png"), raw((10, 30), None, "tall.png")], resolution=16,
                 default_caption="a default")
    assert len(ds) == 2 and list(ds.buckets) == [(16, 16)]
    px = ds.examples[0].pixels
    assert px.shape == (3, 16, 16) and px.dtype == torch.float32 and px.device.type == "cpu"
    assert -1.0 <= px.min() and px.max() <= 1.0
    assert px[1].mean() > 0.9 and px[0].mean() < -0.9  # the green middle third survived
    assert ds.examples[1].pixels.shape == (3, 16, 16)
    assert [ex.caption_given for ex in ds.examples] == [True, False]
    assert ds.examples[1].caption == "a default" and ds.missing_captions == 1


def test_prepare_validates_inputs():
    items = [raw((16, 16))]
    for kwargs, name in [({"resolution": 100}, "resolution"), ({"resolution": 0}, "resolution"),
                         ({"resolution": 16, "repeats": 0}, "repeats"),
                         ({"resolution": 16, "caption_dropout": 1.5}, "caption_dropout"),
                         ({"resolution": 16, "caption_dropout": -0.1}, "caption_dropout"),
                         ({"resolution": 16, "crop": "middle"}, "crop")]:
        with pytest.raises(FinetuneError) as err:
            prepare(items, **kwargs)
        assert err.value.input == name and err.value.fix and err.value.node is None
    with pytest.raises(FinetuneError, match="no images"):
        prepare([], resolution=16)


def test_make_buckets_steps_and_area():
    for res, step in [(64, 8), (128, 8), (512, 64), (1024, 64)]:
        buckets = make_buckets(res)
        assert (res, res) in buckets and len(buckets) >= 5
        for w, h in buckets:
            assert w % step == 0 and h % step == 0
            assert w * h <= res * res and w * h >= 0.75 * res * res
            assert max(w, h) / min(w, h) <= 2.0
        assert any(w > h for w, h in buckets) and any(h > w for w, h in buckets)
    assert all(w % 32 == 0 and h % 32 == 0 for w, h in make_buckets(512, step=32))


def test_bucketing_puts_images_by_aspect():
    ds = prepare([raw((128, 64), name="wide.png"), raw((64, 128), name="tall.png"), raw((50, 50), name="sq.png"),
                  raw((70, 64), name="near_sq.png")], resolution=64, bucketing=True)
    sizes = [ds.size_of(i) for i in range(4)]
    wide, tall, square, near = sizes
    assert wide[0] > wide[1] and tall[1] > tall[0] and square == (64, 64) and near == (64, 64)
    assert all(w % 8 == 0 and h % 8 == 0 for w, h in sizes)
    for i, (w, h) in enumerate(sizes):
        assert ds.examples[i].pixels.shape == (3, h, w)
        assert i in ds.buckets[(w, h)]
    assert sorted(i for idx in ds.buckets.values() for i in idx) == [0, 1, 2, 3]
    no_buckets = prepare([raw((128, 64))], resolution=64)
    assert no_buckets.examples[0].pixels.shape == (3, 64, 64)


def test_random_crop_keeps_cover_size_and_crops_per_batch():
    img = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (32, 1, 3)))  # ramp, 64x32
    ds = prepare([RawExample(img, "ramp", "ramp.png")], resolution=16, crop="random")
    assert ds.random_crop and ds.examples[0].pixels.shape == (3, 16, 32)  # short side = 16, long side kept
    lefts = {round(float(b.pixels[0, 0, 0, 0]), 3) for b in _take(ds.batches(1, seed=3), 30)}
    assert all(b.pixels.shape == (1, 3, 16, 16) for b in _take(ds.batches(1, seed=3), 3))
    assert len(lefts) > 3  # different windows along the ramp


# ---------------------------------------------------------------------------------------------- batches
def _take(it, n):
    return [next(it) for _ in range(n)]


def _mixed_set(**kwargs) -> TrainingSet:
    items = [raw((128, 64), f"wide {i}", f"w{i}.png", (i * 20, 10, 10)) for i in range(5)]
    items += [raw((64, 128), f"tall {i}", f"t{i}.png", (10, i * 20, 10)) for i in range(2)]
    items += [raw((64, 64), f"square {i}", f"s{i}.png", (10, 10, i * 20)) for i in range(3)]
    return prepare(items, resolution=64, bucketing=True, **kwargs)


def test_batches_stay_in_one_bucket_and_pad_small_buckets():
    ds = _mixed_set()
    assert len(ds.buckets) == 3 and len(ds) == 10
    assert ds.steps_per_epoch(4) == 2 + 1 + 1
    for batch in _take(ds.batches(4, seed=1), 40):
        sizes = {ds.size_of(i) for i in batch.indices}
        assert len(sizes) == 1 and len(batch.indices) == 4
        w, h = sizes.pop()
        assert batch.pixels.shape == (4, 3, h, w) and batch.pixels.dtype == torch.float32
        assert len(batch.captions) == len(batch.flipped) == 4
    tall = [b for b in _take(ds.batches(4, seed=1), 8) if ds.size_of(b.indices[0])[1] > 64]
    assert tall and all(set(b.indices) == {5, 6} for b in tall)  # 2-image bucket padded from itself


def test_batches_deterministic_per_seed():
    ds = _mixed_set(flip=True, caption_dropout=0.3)

    def run(seed):
        return [(b.indices, b.captions, b.flipped, b.pixels) for b in _take(ds.batches(2, seed), 20)]

    a, b, c = run(7), run(7), run(8)
    for x, y in zip(a, b):
        assert x[:3] == y[:3] and torch.equal(x[3], y[3])
    assert [x[:3] for x in a] != [x[:3] for x in c]


def test_start_step_resumes_the_same_stream():
    ds = _mixed_set(flip=True, crop="random")
    full = _take(ds.batches(3, seed=5), 12)
    resumed = _take(ds.batches(3, seed=5, start_step=7), 5)
    for x, y in zip(full[7:], resumed):
        assert x.indices == y.indices and x.flipped == y.flipped and torch.equal(x.pixels, y.pixels)
        assert x.step == y.step


def test_flip_is_half_the_time_and_mirrors():
    img = Image.new("RGB", (16, 16), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 8, 16))  # white left half
    ds = prepare([RawExample(img, "half", "half.png")], resolution=16, flip=True)
    batches = _take(ds.batches(4, seed=0), 200)
    flips = [f for b in batches for f in b.flipped]
    assert 0.4 < sum(flips) / len(flips) < 0.6
    for b in batches[:10]:
        for px, flipped in zip(b.pixels, b.flipped):
            left_white = px[:, :, :8].mean() > 0.9
            assert left_white != flipped
    unflipped = prepare([RawExample(img, "half", "half.png")], resolution=16)
    assert not any(f for b in _take(unflipped.batches(4, seed=0), 20) for f in b.flipped)


def test_caption_dropout_and_prefix():
    items = [raw((16, 16), "a red thing"), raw((16, 16), None, "y.png")]
    always = prepare(items, resolution=16, caption_dropout=1.0, caption_prefix="ohwx")
    assert all(c == "" for b in _take(always.batches(2, seed=0), 10) for c in b.captions)
    never = prepare(items, resolution=16, caption_dropout=0.0, caption_prefix="ohwx,")
    caps = {c for b in _take(never.batches(2, seed=0), 10) for c in b.captions}
    assert caps == {"ohwx, a red thing", "ohwx"}
    half = prepare(items, resolution=16, caption_dropout=0.5)
    rng = random.Random(0)
    dropped = sum(half.caption(0, rng) == "" for _ in range(1000))
    assert 400 < dropped < 600
    plain = prepare(items, resolution=16)
    assert plain.caption(0, random.Random(1)) == "a red thing" and plain.caption(1, random.Random(1)) == ""


def test_repeats_multiply_the_epoch():
    items = [raw((16, 16), f"c{i}", f"{i}.png") for i in range(3)]
    ds = prepare(items, resolution=16, repeats=4)
    assert len(ds) == 3 and ds.epoch_size == 12 and ds.steps_per_epoch(2) == 6
    batches = _take(ds.batches(2, seed=0), 12)
    for epoch in (0, 1):
        seen = [i for b in batches if b.epoch == epoch for i in b.indices]
        assert sorted(seen) == [0] * 4 + [1] * 4 + [2] * 4
    assert [b.indices for b in batches[:6]] != [b.indices for b in batches[6:]]  # reshuffled each epoch
    with pytest.raises(FinetuneError, match="batch size"):
        next(ds.batches(0, seed=0))


def test_from_image_batch():
    images = torch.rand(3, 24, 32, 3)
    ds = from_image_batch(images, ["one", "", "three"], resolution=16)
    assert len(ds) == 3 and ds.examples[0].pixels.shape == (3, 16, 16)
    assert [ex.caption_given for ex in ds.examples] == [True, False, True]
    assert [ex.name for ex in ds.examples] == ["image_001", "image_002", "image_003"]
    shared = from_image_batch(images, ["same for all"], resolution=16)
    assert {ex.caption for ex in shared.examples} == {"same for all"}
    expected = images[0].permute(2, 0, 1)[None] * 2 - 1
    single = from_image_batch(images[:1], [], resolution=24, crop="random")
    assert single.examples[0].pixels.shape == (3, 24, 32) and not single.examples[0].caption_given
    assert torch.allclose(single.examples[0].pixels, expected[0], atol=1 / 127)  # no resize: exact up to 8-bit
    with pytest.raises(FinetuneError) as err:
        from_image_batch(images, ["a", "b"], resolution=16)
    assert err.value.input == "captions" and "3" in str(err.value)
    with pytest.raises(FinetuneError, match="IMAGE"):
        from_image_batch(torch.rand(3, 16, 16), [], resolution=16)


# ---------------------------------------------------------------------------------------------- nodes
def test_confinement(input_dir, tmp_path):
    outside = tmp_path / "outside"
    save(outside, "secret.png")
    for name in (str(outside), "/etc", "~/photos", "C:\\photos", "../outside", "sub/../../outside", "..\\outside"):
        with pytest.raises(FinetuneError) as err:
            find_dataset_folder(name)
        assert err.value.node == "FinetuneTrainingData" and err.value.input == "folder" and err.value.fix, name
    with pytest.raises(FinetuneError, match="absolute"):
        TrainingData().run(str(outside), resolution=16)
    try:
        os.symlink(outside, input_dir / "escape", target_is_directory=True)
    except (OSError, NotImplementedError):
        pytest.skip("symlinks not available")
    with pytest.raises(FinetuneError, match="outside the input folder"):
        find_dataset_folder("escape")
    os.symlink(input_dir / "escape", input_dir / "escape2", target_is_directory=True)
    with pytest.raises(FinetuneError, match="outside the input folder"):
        find_dataset_folder("escape2")


def test_find_dataset_folder_inside_input(input_dir):
    save(input_dir / "my_dog" / "3_dog", "a.png")
    assert find_dataset_folder("my_dog") == (input_dir / "my_dog").resolve()
    assert find_dataset_folder(" my_dog/3_dog ") == (input_dir / "my_dog" / "3_dog").resolve()
    os.symlink(input_dir / "my_dog", input_dir / "alias", target_is_directory=True)
    assert find_dataset_folder("alias") == (input_dir / "my_dog").resolve()  # links inside stay allowed
    with pytest.raises(FinetuneError, match="not found"):
        find_dataset_folder("nobody")
    with pytest.raises(FinetuneError, match="a file"):
        find_dataset_folder("my_dog/3_dog/a.png")
    with pytest.raises(FinetuneError, match="empty"):
        find_dataset_folder("  ")


def test_bundled_examples_resolve_and_load():
    assert {"red-circle", "striped-style"} <= set(example_datasets())
    assert find_dataset_folder("[example] red-circle") == EXAMPLE_ROOT / "red-circle"
    assert "[example] striped-style" in TrainingData.INPUT_TYPES()["required"]["folder"][1]["tooltip"]
    ds, preview = TrainingData().run("[example] red-circle", resolution=64)
    assert len(ds) == 6 and ds.missing_captions == 0
    assert all("red circle" in ex.caption for ex in ds.examples)
    assert preview.ndim == 4 and preview.shape[0] == 1 and preview.shape[-1] == 3
    assert 0.0 <= preview.min() and preview.max() <= 1.0
    striped = read_folder(EXAMPLE_ROOT / "striped-style")
    assert len(striped) == 8 and all(ex.image.size == (64, 64) for ex in striped)
    assert all(ex.caption.startswith("a striped ") for ex in striped)
    assert sum(p.stat().st_size for p in EXAMPLE_ROOT.rglob("*") if p.is_file()) < 100_000
    with pytest.raises(FinetuneError, match="no bundled example"):
        find_dataset_folder("[example] nope")


def test_training_data_node_and_is_changed(input_dir):
    folder = input_dir / "set"
    save(folder, "a.png", solid((255, 0, 0), (32, 16)), caption="a red wide thing")
    save(folder, "b.png", solid((0, 0, 255), (16, 32)))
    node = TrainingData()
    ds, preview = node.run("set", resolution=32, crop="random", flip=True, repeats=2, caption_prefix="ohwx",
                           caption_dropout=0.0, bucketing=True)
    assert len(ds) == 2 and ds.repeats == 2 and ds.flip and ds.random_crop and len(ds.buckets) == 2
    assert [ex.caption for ex in ds.examples] == ["a red wide thing", ""]
    assert ds.caption(0, random.Random(0)) == "ohwx a red wide thing" and ds.caption(1, random.Random(0)) == "ohwx"
    assert preview.shape[0] == 1

    sig = TrainingData.IS_CHANGED("set", resolution=16)
    assert sig == TrainingData.IS_CHANGED("set", resolution=512)
    (folder / "b.txt").write_text("now captioned")
    sig2 = TrainingData.IS_CHANGED("set")
    assert sig2 != sig
    save(folder, "c.png")
    assert TrainingData.IS_CHANGED("set") != sig2
    (folder / "unrelated.log").write_text("not data")
    assert TrainingData.IS_CHANGED("set") == TrainingData.IS_CHANGED("set")
    bad = TrainingData.IS_CHANGED("/etc")
    assert bad != bad  # NaN: always re-run, run() reports the error

    with pytest.raises(FinetuneError) as err:
        node.run("set", resolution=12)
    assert err.value.node == "FinetuneTrainingData" and err.value.input == "resolution"


def test_images_node_caption_lines():
    images = torch.rand(2, 16, 16, 3)
    node = TrainingDataFromImages()
    (ds,) = node.run(images, "first\n\nsecond\n", resolution=16)
    assert [ex.caption for ex in ds.examples] == ["first", "second"]
    (ds,) = node.run(images, "  all of them  ", resolution=16, caption_prefix="sks")
    assert {ds.caption(i, random.Random(0)) for i in range(2)} == {"sks all of them"}
    (ds,) = node.run(images, "", resolution=16)
    assert ds.missing_captions == 2
    with pytest.raises(FinetuneError) as err:
        node.run(images, "one\ntwo\nthree", resolution=16)
    assert err.value.node == "FinetuneTrainingDataFromImages" and err.value.input == "captions"
    assert "3 captions for 2 images" in str(err.value) and err.value.fix


def test_images_node_bucketing_is_the_folder_nodes(input_dir):
    """An IMAGE batch has one size: with bucketing every image goes to the bucket nearest the batch's aspect ratio
    (instead of the square), exactly as the Folder node buckets the same pictures read from files."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 24, 48, 3, generator=gen)  # [B, H, W, 3]: 2:1 landscape
    node = TrainingDataFromImages()
    (square,) = node.run(images, "a wide thing", resolution=32)
    assert not square.bucketing and list(square.buckets) == [(32, 32)]
    (ds,) = node.run(images, "a wide thing", resolution=32, bucketing=True)
    assert ds.bucketing and list(ds.buckets) == [(40, 24)] and ds.buckets[(40, 24)] == [0, 1, 2]
    assert all(tuple(ex.pixels.shape) == (3, 24, 40) for ex in ds.examples)

    folder = input_dir / "wide"
    for i in range(3):
        pixels = (images[i].numpy() * 255.0).round().astype(np.uint8)
        save(folder, f"image_{i + 1:03}.png", Image.fromarray(pixels, "RGB"), caption="a wide thing")
    from_files, _ = TrainingData().run("wide", resolution=32, bucketing=True)
    assert from_files.buckets == ds.buckets
    for a, b in zip(from_files.examples, ds.examples):
        assert torch.equal(a.pixels, b.pixels) and a.caption == b.caption

    tall = images.transpose(1, 2)  # 1:2 portrait
    (ds,) = node.run(tall, "", resolution=32, bucketing=True, crop="random", flip=True, repeats=2)
    assert list(ds.buckets) == [(24, 40)] and ds.random_crop and ds.flip and ds.repeats == 2
    batch = next(ds.batches(2, seed=0))
    assert tuple(batch.pixels.shape) == (2, 3, 40, 24)


def test_data_nodes_share_their_options():
    """One definition (DataOptions) for both nodes' options, in the same order after each node's own inputs; the
    Images node's newer bucketing is its last widget (optional), so older workflows keep their widget positions."""
    from comfy_finetune.nodes.data import DATA_OPTIONS, IMAGES_ADDED_OPTIONS
    from comfy_finetune.training.data import DataOptions

    folder = TrainingData.INPUT_TYPES()
    images = TrainingDataFromImages.INPUT_TYPES()
    assert list(folder["required"]) == ["folder", *DATA_OPTIONS]
    old = [n for n in DATA_OPTIONS if n not in IMAGES_ADDED_OPTIONS]
    assert list(images["required"]) == ["images", "captions", *old]
    assert list(images["optional"]) == list(IMAGES_ADDED_OPTIONS) == ["bucketing"]
    images_options = {**images["required"], **images["optional"]}
    for name in DATA_OPTIONS:
        assert images_options[name] == folder["required"][name], name
        assert folder["required"][name][1]["default"] == getattr(DataOptions(), name), name
    # the nodes' run() defaults and prepare / from_image_batch's keyword defaults are DataOptions' too
    for fn in (TrainingData.run, TrainingDataFromImages.run, prepare, from_image_batch):
        params = inspect.signature(fn).parameters
        for name in DATA_OPTIONS:
            if params[name].default is not inspect.Parameter.empty:
                assert params[name].default == getattr(DataOptions(), name), (fn.__qualname__, name)
            else:
                assert name == "resolution" and fn in (prepare, from_image_batch), (fn.__qualname__, name)


@pytest.mark.parametrize("cls", data_nodes.NODES)
def test_node_schema(cls):
    assert cls.CATEGORY == "finetune/training" and cls.DISPLAY_NAME and len(cls.DESCRIPTION) > 20
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
    assert cls.RETURN_TYPES[0] == "FT_DATASET"
    params = inspect.signature(cls.run).parameters
    spec = cls.INPUT_TYPES()
    assert repr(spec) == repr(cls.INPUT_TYPES())
    for name, (typ, opts) in spec["required"].items():
        assert opts.get("tooltip", "").strip(), name
        assert name in params
        if isinstance(typ, list):
            assert opts["default"] in typ
        if typ in ("INT", "FLOAT"):
            assert opts["min"] <= opts["default"] <= opts["max"]
    if cls is TrainingData:
        res = spec["required"]["resolution"][1]
        assert (res["default"], res["min"], res["max"], res["step"]) == (512, 8, 4096, 8)
        assert set(spec["required"]) == {"folder", "resolution", "crop", "flip", "repeats", "caption_prefix",
                                         "caption_dropout", "bucketing"}


def test_colour_profiles(tmp_path):
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    img = Image.new("RGBA", (2, 1), (200, 30, 40, 255))
    img.putpixel((1, 0), (0, 0, 0, 0))
    img.save(tmp_path / "tagged.png", icc_profile=srgb)
    out = load_image_file(tmp_path / "tagged.png")
    assert all(abs(a - b) <= 1 for a, b in zip(rgb_at(out, (0, 0)), (200, 30, 40)))
    assert rgb_at(out, (1, 0)) == (255, 255, 255)  # alpha survives the conversion
    Image.new("RGB", (1, 1), (200, 30, 40)).save(tmp_path / "junk.png", icc_profile=b"not a profile")
    assert rgb_at(load_image_file(tmp_path / "junk.png"), (0, 0)) == (200, 30, 40)


def test_training_set_repr_is_short():
    ds = prepare([raw((16, 16)) for _ in range(3)], resolution=16)
    text = repr(ds)
    assert "3 images" in text and "16x16: 3" in text and "tensor" not in text and len(text) < 300

"""Pre- and post-processing exactly as the official code (OFFICIAL_VQFR.md §6)."""

import numpy as np
import pytest
import torch

from vqfr.errors import InputError
from vqfr.imaging import as_bgr_uint8, load_image, save_image, to_images, to_tensor


def _img(h=5, w=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_to_tensor_is_the_official_formula():
    img = _img()
    t = to_tensor(img)
    # official: img / 255. (float64) -> float32 -> BGR2RGB -> CHW -> normalize(0.5, 0.5)
    expected = torch.from_numpy((img / 255.0).astype(np.float32)[:, :, ::-1].copy()).permute(2, 0, 1)
    expected = (expected - 0.5) / 0.5
    assert t.shape == (1, 3, 5, 7) and t.dtype == torch.float32
    assert torch.equal(t[0], expected)


def test_to_images_is_the_official_formula_and_round_trips():
    img = _img()
    assert np.array_equal(to_images(to_tensor(img))[0], img)
    t = torch.tensor([-2.0, -1.0, 0.0, 0.00196, 1.0, 3.0]).view(1, 3, 1, 2)
    out = to_images(t)[0]
    # clamp to [-1,1], (x+1)/2, *255, round half to even, RGB -> BGR
    rgb = np.round(((np.clip(t.numpy()[0], -1, 1) + 1) / 2 * 255).astype(np.float32)).astype(np.uint8)
    assert np.array_equal(out, rgb.transpose(1, 2, 0)[:, :, ::-1])


def test_batch_and_single_shapes():
    batch = np.stack([_img(seed=i) for i in range(3)])
    t = to_tensor(batch)
    assert t.shape == (3, 3, 5, 7)
    assert to_images(t).shape == (3, 5, 7, 3)
    assert to_images(t[0]).shape == (5, 7, 3)


def test_conversions_never_modify_input():
    img = _img()
    before = img.copy()
    out = as_bgr_uint8(img)
    out[:] = 0
    to_tensor(img)
    assert np.array_equal(img, before)


_GREY = np.append(np.arange(23) * 10, 253).astype(np.uint8).reshape(4, 6)  # every pixel different
_BGR = np.stack([_GREY, _GREY + 1, _GREY + 2], axis=2)  # and every channel, up to 255


@pytest.mark.parametrize("arr,expect_shape,expected", [
    (np.zeros((4, 6), np.uint8), (4, 6, 3), np.zeros((4, 6, 3), np.uint8)),
    (np.zeros((4, 6, 1), np.uint8), (4, 6, 3), np.zeros((4, 6, 3), np.uint8)),
    (np.zeros((4, 6, 4), np.uint8), (4, 6, 3), np.zeros((4, 6, 3), np.uint8)),
    (np.full((4, 6, 3), 65535, np.uint16), (4, 6, 3), np.full((4, 6, 3), 255, np.uint8)),
    (np.full((4, 6, 3), 0.5, np.float32), (4, 6, 3), np.full((4, 6, 3), 128, np.uint8)),  # 127.5 rounds to 128
    # the values: grey repeated into B, G and R; BGRA loses its alpha, not a colour; uint16 is 257x uint8;
    # floats in [0, 1] are scaled by 255 and rounded (not truncated)
    (_GREY, (4, 6, 3), np.repeat(_GREY[:, :, None], 3, axis=2)),
    (_GREY[:, :, None], (4, 6, 3), np.repeat(_GREY[:, :, None], 3, axis=2)),
    (np.concatenate([_BGR, np.full((4, 6, 1), 7, np.uint8)], axis=2), (4, 6, 3), _BGR),
    (_BGR.astype(np.uint16) * 257, (4, 6, 3), _BGR),
    (_BGR.astype(np.float32) / 255, (4, 6, 3), _BGR),
])
def test_odd_formats_are_converted(arr, expect_shape, expected):
    out = as_bgr_uint8(arr)
    assert out.shape == expect_shape and out.dtype == np.uint8
    if arr.dtype == np.uint16:
        assert out.max() == 255
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("arr,match", [
    (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
    (np.zeros((4, 4, 3), np.int64), "dtype"),
    (np.zeros((4, 4, 5), np.uint8), "shape"),
    (np.zeros((0, 4, 3), np.uint8), "shape"),
    (np.full((4, 4, 3), 7.0), r"\[0, 1\]"),
])
def test_bad_arrays_raise_input_error(arr, match):
    with pytest.raises(InputError, match=match):
        as_bgr_uint8(arr, name="arr")


def test_a_pil_image_is_refused_not_taken_for_bgr():
    """``np.asarray`` of a PIL image is RGB (a palette image: its indices): taken for BGR, the faces were restored
    with red and blue swapped, without a word. It is refused with the conversion to make; its array is converted."""
    pil = pytest.importorskip("PIL.Image")
    bgr = _img(8, 8)
    img = pil.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))
    for refused in (img, img.convert("P")):
        with pytest.raises(InputError, match=r"got a PIL image \(mode (RGB|P)\).*Fix: pass the file's path"):
            as_bgr_uint8(refused)
    assert np.array_equal(as_bgr_uint8(np.asarray(img.convert("RGB"))[:, :, ::-1]), bgr)  # the fix it gives


def test_save_and_load_round_trip(tmp_path):
    img = _img(16, 20)
    path = save_image(tmp_path / "x.png", img)
    assert np.array_equal(load_image(path), img)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temporary file left behind


def test_load_refuses_missing_empty_and_garbage(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(InputError, match="text.jpg"):
        load_image(tmp_path / "text.jpg")


def _official_post(t: torch.Tensor) -> np.ndarray:
    """The official post-processing in numpy float32, as basicsr's tensor2img does it."""
    x = (np.clip(t.numpy(), -1, 1) + 1) / 2
    return np.round(x * np.float32(255.0)).astype(np.uint8).transpose(0, 2, 3, 1)[..., ::-1]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU"))])
def test_conversions_are_bit_identical_to_the_official_formulas_for_every_level(device):
    levels = np.arange(256, dtype=np.uint8)
    img = np.stack([levels, levels[::-1], np.roll(levels, 7)], axis=-1).reshape(16, 16, 3)
    expected = torch.from_numpy((img / 255.0).astype(np.float32)[:, :, ::-1].transpose(2, 0, 1).copy())
    t = to_tensor(img, device=device)
    assert t.device.type == device and torch.equal(t[0].cpu(), (expected - 0.5) / 0.5)
    rng = np.random.default_rng(0)
    halfway = (2 * (np.arange(255, dtype=np.float32) + 0.5) / 255 - 1).astype(np.float32)  # x255 near n + 0.5
    values = np.concatenate([rng.uniform(-1.3, 1.3, 3 * 16 * 16 * 2 - 255).astype(np.float32), halfway])
    out = torch.from_numpy(values.reshape(2, 3, 16, 16))
    assert np.array_equal(to_images(out.to(device)), _official_post(out))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_truncated_file_is_one_input_error_with_no_opencv_chatter(tmp_path, capfd, suffix):
    """OpenCV logs its own warning or error for a truncated file (``[ WARN:0@...] ... PNG input buffer is
    incomplete``); the caller gets only the InputError, and OpenCV's log level is left as it was."""
    import cv2

    data = cv2.imencode(suffix, _img(32, 32))[1].tobytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) // 2])
    level = cv2.utils.logging.getLogLevel()
    capfd.readouterr()
    with pytest.raises(InputError, match=f"cut{suffix}"):
        load_image(path)
    assert capfd.readouterr().err == ""
    assert cv2.utils.logging.getLogLevel() == level

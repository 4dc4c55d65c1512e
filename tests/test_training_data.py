"""Degradations (both official parameter sets), datasets and the sampler of training/."""

import math

import cv2
import numpy as np
import pytest
import torch

from training.data import EpochSampler, FaceDataset, PairedDataset, list_images, resolve_root, synthetic_face
from training.degradations import PRESETS, DegradationParams, degrade, gaussian_kernel, sample_rng
from vqfr.errors import ConfigError, InputError

N_DRAWS = 300


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors; two threads only spin on a busy 2-core machine


def _draws(preset: str, n: int = N_DRAWS, size: int = 48):
    img = synthetic_face(3, size).astype(np.float32) / 255.0
    params = PRESETS[preset]
    return img, [degrade(img, sample_rng(7, 0, i), params) for i in range(n)]


@pytest.mark.parametrize("preset", ["v1", "v2"])
def test_degradation_parameter_statistics(preset):
    params = PRESETS[preset]
    img, draws = _draws(preset)
    infos = [info for _, info in draws]

    def check_uniform(values, lo, hi):
        values = np.asarray(values, dtype=np.float64)
        assert values.min() >= lo and values.max() <= hi
        # mean of U(lo, hi) within ~5 standard errors; the spread spans most of the range
        assert abs(values.mean() - (lo + hi) / 2) < 5 * (hi - lo) / math.sqrt(12 * len(values))
        assert values.max() - values.min() > 0.9 * (hi - lo)

    iso = [i for i in infos if i["kind"] == "iso"]
    aniso = [i for i in infos if i["kind"] == "aniso"]
    assert abs(len(iso) / len(infos) - 0.5) < 0.1
    assert all(i["sigma_y"] == i["sigma_x"] and i["theta"] == 0.0 for i in iso)
    check_uniform([i["sigma_x"] for i in infos], *params.blur_sigma)
    check_uniform([i["sigma_y"] for i in aniso], *params.blur_sigma)
    check_uniform([i["theta"] for i in aniso], -math.pi, math.pi)
    check_uniform([i["scale"] for i in infos], *params.downsample_range)
    check_uniform([i["noise_sigma"] for i in infos], *params.noise_range)
    q = np.array([i["jpeg_quality"] for i in infos])
    assert q.dtype.kind == "i" and q.min() >= params.jpeg_range[0] and q.max() <= params.jpeg_range[1]
    assert abs(q.mean() - (sum(params.jpeg_range) / 2 - 0.5)) < 3  # int() truncation lowers the mean by 0.5
    h, w = img.shape[:2]
    assert all(i["low_size"] == (max(1, int(w // i["scale"])), max(1, int(h // i["scale"]))) for i in infos)
    for lq, _ in draws[:50]:
        assert lq.shape == img.shape and lq.dtype == np.float32
        assert lq.min() >= 0 and lq.max() <= 1
        np.testing.assert_allclose(lq * 255, np.rint(lq * 255), atol=1e-4)  # 8-bit values


def test_v2_degrades_more_than_v1():
    def mean_psnr(preset):
        img, draws = _draws(preset, 120, 64)
        mse = [float(np.mean((lq - img) ** 2)) for lq, _ in draws]
        return float(np.mean([10 * math.log10(1 / m) for m in mse]))

    v1, v2 = mean_psnr("v1"), mean_psnr("v2")
    assert v2 < v1 - 1.0, (v1, v2)


def test_degradation_is_reproducible_and_leaves_input_alone():
    img = synthetic_face(1, 64).astype(np.float32) / 255.0
    before = img.copy()
    a, ia = degrade(img, sample_rng(3, 2, 5), PRESETS["v2"])
    b, ib = degrade(img, sample_rng(3, 2, 5), PRESETS["v2"])
    c, _ = degrade(img, sample_rng(3, 2, 6), PRESETS["v2"])
    d, _ = degrade(img, sample_rng(3, 3, 5), PRESETS["v2"])
    assert np.array_equal(a, b) and ia == ib
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    assert np.array_equal(img, before)


def test_gaussian_kernel_moments_match_the_covariance():
    k = gaussian_kernel(41, 2.0, 3.5, 0.6)
    assert k.shape == (41, 41) and abs(k.sum() - 1) < 1e-12
    r = np.arange(41) - 20
    xx, yy = np.meshgrid(r, r)
    cov = np.array([[np.sum(k * xx * xx), np.sum(k * xx * yy)], [np.sum(k * xx * yy), np.sum(k * yy * yy)]])
    rot = np.array([[math.cos(0.6), -math.sin(0.6)], [math.sin(0.6), math.cos(0.6)]])
    np.testing.assert_allclose(cov, rot @ np.diag([4.0, 12.25]) @ rot.T, atol=1e-6)
    iso = gaussian_kernel(41, 1.5, 1.5, 0.0)
    np.testing.assert_allclose(iso, iso.T, atol=1e-15)  # isotropic: symmetric
    np.testing.assert_allclose(np.sum(iso * xx * xx), 2.25, rtol=1e-6)


def test_degradation_params_from_official_options():
    opts = {"blur_kernel_size": 41, "kernel_list": ["iso", "aniso"], "kernel_prob": [0.5, 0.5],
            "blur_sigma": [0.1, 10], "downsample_range": [0.8, 8], "noise_range": [0, 20], "jpeg_range": [60, 100],
            "dataroot_gt": "ignored"}
    assert DegradationParams.from_options(opts) == PRESETS["v1"]
    assert DegradationParams.from_options({"degradation": "v2"}) == PRESETS["v2"]
    with pytest.raises(ValueError, match="kernel_prob"):
        DegradationParams(kernel_prob=(0.3, 0.3))


def test_face_dataset_items_flips_and_degradation():
    ds = FaceDataset("synthetic:6", 32, use_hflip=True, degradation=PRESETS["v2"], seed=1)
    plain = FaceDataset("synthetic:6", 32, use_hflip=False, seed=1)
    flips = 0
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            assert item["gt"].shape == item["lq"].shape == (3, 32, 32)
            assert item["gt"].dtype == torch.float32 and item["gt"].abs().max() <= 1
            ref = plain[i]["gt"]
            flipped = torch.equal(item["gt"], ref.flip(-1))
            assert flipped or torch.equal(item["gt"], ref)
            flips += flipped
            lq255 = (item["lq"] * 0.5 + 0.5) * 255  # LQ holds 8-bit values
            torch.testing.assert_close(lq255, lq255.round(), atol=1e-3, rtol=0)
    assert 4 <= flips <= 20  # 24 draws at p = 0.5
    ds.set_epoch(1)
    again = FaceDataset("synthetic:6", 32, use_hflip=True, degradation=PRESETS["v2"], seed=1)
    again.set_epoch(1)
    assert torch.equal(ds[2]["lq"], again[2]["lq"])


def test_folder_dataset_reads_recursively_and_rejects_bad_files(tmp_path):
    (tmp_path / "a" / "00000").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "a" / "00000" / "1.png"), synthetic_face(0, 40))
    cv2.imwrite(str(tmp_path / "a" / "2.jpg"), synthetic_face(1, 24))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    files = list_images(tmp_path / "a")
    assert [p.name for p in files] == ["1.png", "2.jpg"]
    ds = FaceDataset(str(tmp_path / "a"), 32, use_hflip=False)
    assert ds[0]["gt"].shape == ds[1]["gt"].shape == (3, 32, 32)  # resized to out_size
    cv2.imwrite(str(tmp_path / "a" / "3.png"), np.zeros((20, 30, 3), np.uint8))
    ds = FaceDataset(str(tmp_path / "a"), 32, use_hflip=False)
    item = ds[2]  # skipped for a readable face, and named with the reason for the trainer's warning
    assert item["gt"].shape == (3, 32, 32) and "3.png" in item["skipped"] and "square" in item["skipped"]
    with pytest.raises(InputError, match="square") as err:
        ds.source.read(2)
    assert "3.png" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(ConfigError, match="none of the data roots"):
        resolve_root([str(tmp_path / "missing")])
    assert resolve_root([str(tmp_path / "missing"), "synthetic:4"]) == "synthetic:4"


def test_paired_dataset_matches_by_name_and_reports_missing_pairs(tmp_path):
    (tmp_path / "gt").mkdir()
    (tmp_path / "lq").mkdir()
    for i in range(3):
        cv2.imwrite(str(tmp_path / "gt" / f"f{i}.png"), synthetic_face(i, 32))
    for i in range(2):
        cv2.imwrite(str(tmp_path / "lq" / f"f{i}.png"), synthetic_face(i + 10, 32))
    with pytest.raises(ConfigError, match="no LQ image for 1"):
        PairedDataset(str(tmp_path / "gt"), 32, str(tmp_path / "lq"))
    cv2.imwrite(str(tmp_path / "lq" / "f2.png"), synthetic_face(12, 32))
    ds = PairedDataset(str(tmp_path / "gt"), 32, str(tmp_path / "lq"))
    assert [ds[i]["name"] for i in range(3)] == ["f0", "f1", "f2"]
    assert not torch.equal(ds[0]["lq"], ds[0]["gt"])
    synth = PairedDataset(str(tmp_path / "gt"), 32, degradation=PRESETS["v1"], seed=5)
    assert torch.equal(synth[1]["lq"], PairedDataset(str(tmp_path / "gt"), 32, degradation=PRESETS["v1"],
                                                     seed=5)[1]["lq"])


def test_sampler_global_batches_do_not_depend_on_world_size():
    one = EpochSampler(23, 4, world_size=1, rank=0, seed=3)
    ranks = [EpochSampler(23, 2, world_size=2, rank=r, seed=3) for r in range(2)]
    for s in [one, *ranks]:
        s.set_epoch(2)
    single = list(one)
    split = [a + b for a, b in zip(*[list(s) for s in ranks], strict=True)]
    assert single == split and len(single) == 23 // 4
    one.set_epoch(2, start_batch=3)
    assert list(one) == single[3:]
    one.set_epoch(3)
    assert list(one) != single
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        EpochSampler(3, 2, world_size=2)

"""RetinaFace-R50 with facexlib's state-dict layout: keys and shapes, loading by path, prior layout and decoding.

No real RetinaFace weights are available offline, so the network runs on random weights here; what is checked is
that a facexlib checkpoint's layout loads strictly and that outputs are decoded to the right pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vqfr.errors import ConfigError
from vqfr.faces.detector import load_detector
from vqfr.faces.retinaface import RetinaFace, RetinaFaceNet, decode_boxes, decode_landmarks, prior_boxes

# Keys and shapes of facexlib's detection_Resnet50_Final.pth (torchvision ResNet-50 body, FPN, SSH, 2 anchors).
FACEXLIB_KEYS = {
    "body.conv1.weight": (64, 3, 7, 7),
    "body.bn1.running_var": (64,),
    "body.layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "body.layer2.0.conv2.weight": (128, 128, 3, 3),
    "body.layer3.5.bn3.weight": (1024,),
    "body.layer4.2.conv3.weight": (2048, 512, 1, 1),
    "fpn.output1.0.weight": (256, 512, 1, 1),
    "fpn.output3.1.num_batches_tracked": (),
    "fpn.merge2.0.weight": (256, 256, 3, 3),
    "ssh1.conv3X3.0.weight": (128, 256, 3, 3),
    "ssh2.conv5X5_1.0.weight": (64, 256, 3, 3),
    "ssh3.conv7X7_2.1.bias": (64,),
    "ssh3.conv7x7_3.0.weight": (64, 64, 3, 3),
    "ClassHead.0.conv1x1.weight": (4, 256, 1, 1),
    "BboxHead.1.conv1x1.bias": (8,),
    "LandmarkHead.2.conv1x1.weight": (20, 256, 1, 1),
}


@pytest.fixture(scope="module")
def net_state():
    torch.manual_seed(0)
    return RetinaFaceNet().state_dict()


@pytest.fixture(scope="module")
def weights(tmp_path_factory, net_state):
    path = tmp_path_factory.mktemp("retinaface") / "detection_Resnet50_Final.pth"
    torch.save({f"module.{k}": v for k, v in net_state.items()}, path)  # facexlib's files carry "module."
    return path


def test_state_dict_layout_matches_facexlib(net_state):
    for key, shape in FACEXLIB_KEYS.items():
        assert key in net_state, key
        assert tuple(net_state[key].shape) == shape, key
    assert not any(k.startswith("body.fc") or k.startswith("body.layer5") for k in net_state)
    # 27.3 M parameters (the published RetinaFace-R50 size), BatchNorm statistics aside
    params = sum(v.numel() for k, v in net_state.items() if not k.endswith(("running_mean", "running_var",
                                                                            "num_batches_tracked")))
    assert 27.2e6 < params < 27.4e6


def test_loads_a_facexlib_style_file_by_path(tmp_path, net_state, weights):
    path = weights
    det = load_detector(str(path))
    assert isinstance(det, RetinaFace)
    assert isinstance(load_detector(f"retinaface:{path}"), RetinaFace)
    out = det.detect(np.zeros((40, 56, 3), np.uint8))
    assert isinstance(out, list)
    broken = dict(net_state)
    broken.pop("ssh1.conv3X3.0.weight")
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ConfigError, match="does not hold RetinaFace-R50 weights"):
        RetinaFace(tmp_path / "broken.pth")


def test_unreadable_detector_weights_name_the_detectors_file_not_vqfrs(tmp_path):
    """The reading errors of a VQFR checkpoint, reworded for the detector: a missing or corrupt file names the
    detector's weights and how to get them, never "a VQFR .pth"."""
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 not a checkpoint")
    cases = [
        (f"retinaface:{tmp_path / 'missing.pth'}", "cannot read RetinaFace weights: does not exist",
         "check the path; pass facexlib's detection_Resnet50_Final.pth"),
        (f"retinaface:{tmp_path / 'cut.pth'}", "cannot read RetinaFace weights: is not a readable PyTorch checkpoint",
         "re-download the file; it may be truncated; pass facexlib's detection_Resnet50_Final.pth"),
        (f"mtcnn:{tmp_path / 'missing.pth'}", "cannot read MTCNN weights: does not exist",
         "check the path; pass an MTCNN .safetensors, or reinstall vqfr-deploy for the embedded weights"),
        (str(tmp_path / "cut.pth"), "cannot read detector weights: is not a readable PyTorch checkpoint",
         "pass facexlib's detection_Resnet50_Final.pth or an MTCNN .safetensors"),
    ]
    for spec, reason, fix in cases:
        with pytest.raises(ConfigError) as info:
            load_detector(spec)
        assert info.value.reason.startswith(reason), info.value
        assert info.value.fix.endswith(fix) and "VQFR" not in str(info.value), info.value
        assert info.value.path is not None and info.value.path.name in spec


def test_prior_layout():
    priors = prior_boxes(64, 96)
    # stride 8: 8x12 cells, stride 16: 4x6, stride 32: 2x3; two anchors each
    assert priors.shape == ((8 * 12 + 4 * 6 + 2 * 3) * 2, 4)
    np.testing.assert_allclose(priors[0], [4 / 96, 4 / 64, 16 / 96, 16 / 64])
    np.testing.assert_allclose(priors[1], [4 / 96, 4 / 64, 32 / 96, 32 / 64])
    np.testing.assert_allclose(priors[2], [12 / 96, 4 / 64, 16 / 96, 16 / 64])  # next cell along the row
    np.testing.assert_allclose(priors[2 * 12], [4 / 96, 12 / 64, 16 / 96, 16 / 64])  # next row
    np.testing.assert_allclose(priors[-1], [80 / 96, 48 / 64, 512 / 96, 512 / 64])


def test_decoding():
    priors = np.array([[0.5, 0.5, 0.2, 0.4]], np.float32)
    np.testing.assert_allclose(decode_boxes(np.zeros((1, 4), np.float32), priors), [[0.4, 0.3, 0.6, 0.7]], atol=1e-7)
    loc = np.array([[1.0, -2.0, np.log(2) / 0.2, 0.0]], np.float32)
    # centre moves by 0.1 * offset * prior size; the width doubles
    np.testing.assert_allclose(decode_boxes(loc, priors), [[0.32, 0.22, 0.72, 0.62]], atol=1e-6)
    marks = np.tile(np.array([[1.0, 1.0]], np.float32), (1, 5))
    np.testing.assert_allclose(decode_landmarks(marks, priors)[0], np.tile([[0.52, 0.54]], (5, 1)), atol=1e-7)


def test_detect_turns_network_outputs_into_pixels(weights):
    det = RetinaFace(weights)
    h, w = 64, 96
    priors = prior_boxes(h, w)
    n = len(priors)
    target = 2 * (8 * 12) + 2 * (1 * 6 + 2) + 1  # stride 16, row 1, col 2, large anchor (128 px)
    loc, marks = torch.zeros(1, n, 4), torch.zeros(1, n, 10)
    marks[0, target] = torch.tensor([-2.0, -1, 2, -1, 0, 0, -1.5, 2, 1.5, 2])
    score = torch.zeros(1, n)
    score[0, target] = 0.99

    class Fixed(torch.nn.Module):
        def forward(self, x):
            assert x.shape == (1, 3, h, w)
            return loc, score, marks

    det.net = Fixed()
    (face,) = det.detect(np.zeros((h, w, 3), np.uint8))
    cx, cy = (2 + 0.5) * 16, (1 + 0.5) * 16
    np.testing.assert_allclose(face.box, [cx - 64, cy - 64, cx + 64, cy + 64], atol=1e-4)
    np.testing.assert_allclose(face.landmarks[0], [cx - 2 * 0.1 * 128, cy - 0.1 * 128], atol=1e-4)
    np.testing.assert_allclose(face.landmarks[4], [cx + 1.5 * 0.1 * 128, cy + 2 * 0.1 * 128], atol=1e-4)
    assert face.score == pytest.approx(0.99)
    score[0, target] = 0.9  # below the official 0.97
    assert det.detect(np.zeros((h, w, 3), np.uint8)) == []


def test_a_large_photo_is_detected_on_a_bounded_copy(weights):
    """RetinaFace at full resolution needs about 0.26 GB a megapixel on the CPU (measured at 1 MP), 12 GB for a
    48 MP photo: photos over ``max_pixels`` (16 MP by default) are searched on an area-downscaled copy, and the
    boxes and landmarks come back in the photo's pixels."""
    det = RetinaFace(weights)
    assert det.max_pixels == 16_000_000
    seen = []

    class Fixed(torch.nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape))
            n = len(prior_boxes(x.shape[2], x.shape[3]))
            score = torch.zeros(1, n)
            score[0, 0] = 0.99  # first prior: stride 8, top-left cell, 16 px anchor
            return torch.zeros(1, n, 4), score, torch.zeros(1, n, 10)

    det.net = Fixed()
    h, w = 3000, 6000  # 18 MP
    (face,) = det.detect(np.zeros((h, w, 3), np.uint8))
    (_, _, sh, sw), = seen
    assert sh * sw <= 16_000_000 and abs(sw / sh - 2) < 1e-3
    f = w / sw
    np.testing.assert_allclose(face.box, np.array([4 - 8, 4 - 8, 4 + 8, 4 + 8]) * f, rtol=1e-4)
    np.testing.assert_allclose(face.landmarks, np.full((5, 2), 4 * f), rtol=1e-4)
    small = RetinaFace(weights, max_pixels=64 * 96)
    small.net = Fixed()
    small.detect(np.zeros((128, 192, 3), np.uint8))
    assert seen[-1] == (1, 3, 64, 96)


def test_runtime_and_load_detector_set_the_detectors_pixel_cap(weights):
    """RetinaFace's ``max_pixels`` could be set only by building the detector yourself: ``Runtime(detector=
    "retinaface:PATH")`` and the CLI always got 16 MP. ``Runtime(detector_max_pixels=N)`` and ``load_detector(...,
    max_pixels=N)`` set it; the photo the network sees is bounded by it."""
    from tests.conftest import TINY_V2, seeded_model
    from vqfr import Runtime

    assert load_detector(f"retinaface:{weights}", max_pixels=1000).max_pixels == 1000
    assert load_detector(str(weights), max_pixels=1000).max_pixels == 1000  # kind read from the file
    assert load_detector(str(weights)).max_pixels == 16_000_000  # None: the detector's own default
    rt = Runtime(seeded_model(TINY_V2), device="cpu", detector=f"retinaface:{weights}",
                 detector_max_pixels=64 * 96)
    seen = []

    class NoFaces(torch.nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape))
            n = len(prior_boxes(x.shape[2], x.shape[3]))
            return torch.zeros(1, n, 4), torch.zeros(1, n), torch.zeros(1, n, 10)

    rt.detector.net = NoFaces()
    assert rt.restore(np.zeros((128, 192, 3), np.uint8), upscale=1).shape == (128, 192, 3)
    assert seen == [(1, 3, 64, 96)]
    for bad in (0, -5, 2.5):
        with pytest.raises(ConfigError, match=rf"detector_max_pixels must be a positive integer, got {bad}"):
            Runtime(seeded_model(TINY_V2), device="cpu", detector=f"retinaface:{weights}", detector_max_pixels=bad)
        with pytest.raises(ConfigError, match=rf"max_pixels must be a positive integer, got {bad}"):
            load_detector(f"retinaface:{weights}", max_pixels=bad)

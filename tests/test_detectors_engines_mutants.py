"""What mutation testing of the face detectors, the benchmark's engine cache and the CPU latency tool found
unchecked: NMS keeping a box whose overlap equals the threshold (the official ``<=``), the eye distance taken between
the two eyes, ``max_pixels=True`` refused, a weights file with a ResNet body but no landmark head refused as no
detector's, and the missing file named in the error; MTCNN's crops (RGB, ``(u - 127.5) / 128``, black outside the
photo, area-resized), its P-Net cells and pyramid, each stage's boxes squared before the next crop, and its default
minimum face and thresholds; RetinaFace's priors on odd sizes, its heads' layout and face class, NMS at IoU 0.4 and
the 0.97 threshold; the engine cache's file names (architecture, 12 hex digits of the weights' sha256, kind,
precision, batch or device), one digest for random weights even after their file is written, their options in that
digest, and a missing exporter reported as BackendUnavailable; and ``deploy.cpu_latency``'s median (not mean), rows
labelled with the fidelity they ran, the thread count given to torch, the header, timing without autograd, and (a
defect, fixed) a negative ``--warmup`` refused before the model is built. Expected values are written out in each
test (hand arithmetic, hashlib on the file, scripted clocks, stand-in networks), on tiny inputs, on the CPU."""

from __future__ import annotations

import hashlib
import math
import re
import types

import numpy as np
import pytest
import torch
from torch import nn

from vqfr.errors import BackendUnavailable, ConfigError
from vqfr.faces.detector import Detection, check_max_pixels, load_detector, nms


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors; two threads only spin on a busy 2-core machine


# ----------------------------------------------------------------------------------------------- detector.py
def test_nms_keeps_a_box_whose_overlap_equals_the_threshold():
    """Boxes of area 3 overlapping by 2: IoU 2 / (3 + 3 - 2) = 0.5 exactly. "Above the threshold" drops a box, so
    at 0.5 both stay (facexlib's and MTCNN's ``<=``); just under it the lower-scoring one goes."""
    boxes = np.array([[0, 0, 3, 1], [1, 0, 4, 1]], np.float32)
    scores = np.array([0.9, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert nms(boxes, scores, 0.49).tolist() == [0]
    # over the smaller area: 2 / 3
    assert nms(boxes, scores, 2 / 3, mode="min").tolist() == [0, 1]
    assert nms(boxes, scores, 0.66, mode="min").tolist() == [0]


def test_eye_distance_is_between_the_two_eyes():
    """``Runtime(eye_dist_threshold=)`` drops faces by this distance: left eye to right eye, not to the nose."""
    marks = np.array([[10, 20], [13, 24], [40, 60], [5, 80], [30, 90]], np.float32)
    det = Detection(np.array([0, 0, 50, 100], np.float32), 0.9, marks)
    assert det.eye_distance == pytest.approx(5.0)  # 3-4-5


def test_max_pixels_refuses_booleans_and_returns_a_plain_int():
    """``True`` is an int to Python, but a pixel cap of 1 given as a flag is a mistake: refused like 0."""
    with pytest.raises(ConfigError, match=r"max_pixels must be a positive integer, got True"):
        check_max_pixels(True)
    with pytest.raises(ConfigError, match=r"detector_max_pixels must be a positive integer, got False"):
        check_max_pixels(False, name="detector_max_pixels")
    got = check_max_pixels(np.int64(5000), "mtcnn")
    assert got == 5000 and type(got) is int


def test_weights_with_a_resnet_body_but_no_landmark_head_are_no_detectors(tmp_path):
    """A ResNet checkpoint with ``body.*`` keys is not RetinaFace: told it is no detector's weights (with the kinds
    known), not sent to RetinaFace's strict load."""
    path = tmp_path / "classifier.pth"
    torch.save({"body.conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}, path)
    with pytest.raises(ConfigError, match=r"classifier\.pth: holds weights of no detector known here"):
        load_detector(path)


def test_a_missing_weights_file_is_named_in_the_error(tmp_path):
    missing = tmp_path / "no_such_detector.pth"
    with pytest.raises(ConfigError) as exc:
        load_detector(missing)
    assert str(exc.value).startswith(f"{missing}: is neither a detector name nor an existing weights file")
    assert "Fix: use one of ['mtcnn', 'retinaface'] or NAME:PATH" in str(exc.value)


# ----------------------------------------------------------------------------------------------- mtcnn.py
class _Recorder(nn.Module):
    """A stand-in R-Net or P-Net: records its inputs and answers the given outputs (nothing passes R-Net)."""

    def __init__(self, answer=None):
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.answer = answer

    def forward(self, x):
        self.seen.append(x.clone())
        if self.answer is not None:
            return self.answer(x)
        return torch.zeros(x.shape[0]), torch.zeros(x.shape[0], 4)


def _expected_crop(img_bgr: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The crop the paper describes, in float64: the box's pixels (black outside the photo), RGB, area-averaged to
    ``size`` (the box side is a multiple of it), then ``(u - 127.5) / 128``, channels first."""
    x1, y1, x2, y2 = box
    pad = 100
    canvas = np.zeros((img_bgr.shape[0] + 2 * pad, img_bgr.shape[1] + 2 * pad, 3))
    canvas[pad:pad + img_bgr.shape[0], pad:pad + img_bgr.shape[1]] = img_bgr[:, :, ::-1]
    patch = canvas[y1 + pad:y2 + pad, x1 + pad:x2 + pad]
    k = patch.shape[0] // size
    patch = patch.reshape(size, k, size, k, 3).mean((1, 3))
    return ((patch - 127.5) / 128).transpose(2, 0, 1)


def test_mtcnn_crops_are_rgb_normalised_black_outside_and_area_resized(monkeypatch):
    """R-Net's 24x24 crops: boxes rounded to whole pixels (5.6 -> 6), a box over the left or right edge padded with
    black (0 -> -127.5 / 128), the last column and row of the photo inside, a 72 px box averaged over 3x3 pixels."""
    from vqfr.faces.mtcnn import MTCNN

    img = np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8)
    det = MTCNN()
    boxes = [(-12, 31, 12, 55), (62, 62, 86, 86), (6, 6, 30, 30), (4, 4, 76, 76)]
    given = [[-12.4, 30.6, 11.6, 54.6], [62, 62, 86, 86], [5.6, 5.6, 29.6, 29.6], [4, 4, 76, 76]]
    monkeypatch.setattr(det, "_proposals", lambda rgb: np.array([[*b, 0.9] for b in given], np.float32))
    det.rnet = _Recorder()
    assert det.detect(img) == []
    (x,) = det.rnet.seen
    assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32
    for i, box in enumerate(boxes):
        np.testing.assert_allclose(x[i].numpy(), _expected_crop(img, box, 24), atol=2e-5, err_msg=str(box))


def test_mtcnn_proposals_from_pnet_cells(monkeypatch):
    """Stage 1 with a stand-in P-Net on a 20x43 photo (smallest face 20 px): one pyramid level, 12x26 (the photo
    times 12 / 20, rounded up; 20 * 0.6 = 12 is still a level). Cell (y, x) is the 12x12 window at (2x, 2y) of the
    level, mapped back by the level's own x and y ratios (26 / 43, 12 / 20); a score of exactly the threshold counts;
    NMS at 0.5 within the level (before the regression), at 0.7 after it; boxes squared."""
    from vqfr.faces.mtcnn import MTCNN

    prob = torch.zeros(1, 2, 3)
    reg = torch.zeros(1, 4, 2, 3)
    prob[0, 0, 0] = 0.9  # window [0, 0, 12, 12]
    prob[0, 0, 2] = 0.5  # [4, 0, 16, 12]: IoU 0.5 with the first, kept; moved 1/12 of its width left: IoU 0.6
    reg[0, 0, 0, 2] = reg[0, 2, 0, 2] = -1 / 12
    prob[0, 1, 1] = 0.8  # [2, 2, 14, 14]: IoU 100 / 188 with the first, dropped within the level
    prob[0, 1, 2] = 0.49  # under the threshold
    pnet = _Recorder(lambda x: (prob, reg))
    det = MTCNN(thresholds=(0.5, 0.7, 0.95))
    det.pnet = pnet
    got = det._proposals(np.zeros((20, 43, 3), np.uint8))
    assert [tuple(x.shape) for x in pnet.seen] == [(1, 3, 12, 26)]
    rx = 26 / 43
    w = 12 / rx  # each window's width in the photo; its height is 12 / (12 / 20) = 20
    first = [0.0, 0.0, w, 20.0]
    second = [4 / rx - w / 12, 0.0, 16 / rx - w / 12, 20.0]

    def square(b):
        side = max(b[2] - b[0], b[3] - b[1])
        x1, y1 = b[0] + (b[2] - b[0] - side) / 2, b[1] + (b[3] - b[1] - side) / 2
        return [x1, y1, x1 + side, y1 + side]

    np.testing.assert_allclose(got, [[*square(first), 0.9], [*square(second), 0.5]], atol=1e-4)


def test_mtcnn_pyramid_levels_and_defaults():
    """A 40x40 photo: levels 24, 17.016 -> 18 and 12.06 -> 13 px (scale 0.6, step 0.709), none under 12. The
    defaults: faces from 20 px, thresholds 0.6 / 0.7 / 0.95, the largest level 4 MP (a 12000x1000 photo is searched
    from a 6929x578 level, not 7200x600)."""
    from vqfr.faces.mtcnn import MTCNN

    det = MTCNN()
    assert (det.min_face, det.thresholds, det.factor, det.max_level_pixels) == (20, (0.6, 0.7, 0.95), 0.709,
                                                                                4_000_000)
    det.pnet = _Recorder(lambda x: (torch.zeros(1, 1, 1), torch.zeros(1, 4, 1, 1)))
    assert len(det._proposals(np.zeros((40, 40, 3), np.uint8))) == 0
    assert [tuple(x.shape[2:]) for x in det.pnet.seen] == [(24, 24), (18, 18), (13, 13)]
    det.pnet.seen.clear()
    det._proposals(np.zeros((12000, 1000, 3), np.uint8))  # 12 MP: the first level is 4 MP, not 0.6 of each side
    assert tuple(det.pnet.seen[0].shape[2:]) == (6929, 578)  # 12000 and 1000 times sqrt(1 / 3), rounded up


def test_mtcnn_squares_each_stages_boxes_before_the_next_crop(monkeypatch):
    """A 96 px proposal widened by R-Net to 144x96 is squared (144 px, same centre) before O-Net's crop; O-Net's box,
    lengthened to 144x192, is reported as is, and the landmark pass crops its 192 px square. Every crop is checked
    against the photo (sides 4x, 3x and 4x the net's input: plain block means)."""
    from vqfr.faces.mtcnn import MTCNN

    img = np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    det = MTCNN()
    monkeypatch.setattr(det, "_proposals", lambda rgb: np.array([[20, 20, 116, 116, 0.9]], np.float32))
    det.rnet = _Recorder(lambda x: (torch.full((x.shape[0],), 0.8), torch.tensor([[0.0, 0.0, 0.5, 0.0]])))
    marks = torch.full((1, 10), 0.5)
    det.onet = _Recorder(lambda x: (torch.full((x.shape[0],), 0.99), torch.tensor([[0.0, 0.0, 0.0, 1 / 3]]), marks))
    (face,) = det.detect(img)
    np.testing.assert_allclose(face.box, [20, -4, 164, 188], atol=1e-3)
    np.testing.assert_allclose(face.landmarks, np.full((5, 2), -4 + 0.5 * 192 - 0.5), atol=1e-3)
    (r,) = det.rnet.seen
    np.testing.assert_allclose(r[0].numpy(), _expected_crop(img, (20, 20, 116, 116), 24), atol=2e-5)
    first, second = det.onet.seen
    np.testing.assert_allclose(first[0].numpy(), _expected_crop(img, (20, -4, 164, 140), 48), atol=2e-5)
    np.testing.assert_allclose(second[0].numpy(), _expected_crop(img, (-4, -4, 188, 188), 48), atol=2e-5)


# ----------------------------------------------------------------------------------------------- retinaface.py
def test_retinaface_priors_match_the_networks_cells_on_odd_sizes():
    """A 37x50 photo: the stride-8/16/32 maps are 5x7, 3x4 and 2x2 (the convolutions round up), two anchors each:
    (35 + 12 + 4) * 2 = 102 priors, as many as the network answers."""
    from vqfr.faces.retinaface import RetinaFaceNet, prior_boxes

    assert len(prior_boxes(37, 50)) == 102
    with torch.no_grad():
        loc, score, marks = RetinaFaceNet().eval()(torch.zeros(1, 3, 37, 50))
    assert loc.shape == (1, 102, 4) and score.shape == (1, 102) and marks.shape == (1, 102, 10)


def test_retinaface_head_layout_and_face_probability():
    """Each head's 1x1 conv answers ``anchors * per_anchor`` channels per cell; they are read cell by cell in rows
    (then anchor, then value), the order of the priors. The face probability is the softmax's second class."""
    from vqfr.faces.retinaface import RetinaFaceNet, _Head

    head = _Head(1, per_anchor=2, anchors=2)
    with torch.no_grad():
        head.conv1x1.weight.copy_(torch.arange(1.0, 5.0).reshape(4, 1, 1, 1))  # channel k = x * (k + 1)
        head.conv1x1.bias.zero_()
        x = torch.arange(1.0, 7.0).reshape(1, 1, 2, 3)
        out = head(x)
    expected = [[v * (2 * a + j + 1) for j in range(2)] for v in range(1, 7) for a in range(2)]
    np.testing.assert_allclose(out[0].numpy(), expected)

    net = RetinaFaceNet().eval()
    with torch.no_grad():
        for h in net.ClassHead:
            h.conv1x1.weight.zero_()
            h.conv1x1.bias.copy_(torch.tensor([0.0, 3.0, 0.0, 3.0]))  # (background, face) logits per anchor
        _, score, _ = net(torch.zeros(1, 3, 32, 32))
    np.testing.assert_allclose(score.numpy(), math.exp(3) / (1 + math.exp(3)), rtol=1e-6)


def test_retinaface_suppresses_overlaps_above_0_4_and_scores_under_0_97(tmp_path):
    """Two priors of one stride-8 cell (centre (20, 20) of a 64x64 photo): the 32 px box (score 0.99) and the 16 px
    one grown to 32 * sqrt(0.45) px (0.98) inside it: IoU 0.45, over the official 0.4, so one face; at IoU 0.35 both
    stay, the higher score first; scores of 0.96 are no faces (threshold 0.97)."""
    from vqfr.faces.retinaface import RetinaFace, RetinaFaceNet

    path = tmp_path / "detection_Resnet50_Final.pth"
    torch.save(RetinaFaceNet().state_dict(), path)
    det = RetinaFace(path)
    n = (8 * 8 + 4 * 4 + 2 * 2) * 2
    small, large = 2 * (2 * 8 + 2), 2 * (2 * 8 + 2) + 1

    def run(iou, scores=(0.98, 0.99)):
        side = 32 * math.sqrt(iou)
        loc, score = torch.zeros(1, n, 4), torch.zeros(1, n)
        loc[0, small, 2:] = math.log(side / 16) / 0.2
        score[0, small], score[0, large] = scores
        det.net = lambda x: (loc, score, torch.zeros(1, n, 10))
        return det.detect(np.zeros((64, 64, 3), np.uint8)), side

    faces, _ = run(0.45)
    assert len(faces) == 1 and faces[0].score == pytest.approx(0.99)
    np.testing.assert_allclose(faces[0].box, [4, 4, 36, 36], atol=1e-4)
    faces, side = run(0.35)
    assert [f.score for f in faces] == pytest.approx([0.99, 0.98])
    np.testing.assert_allclose(faces[1].box, [20 - side / 2, 20 - side / 2, 20 + side / 2, 20 + side / 2], atol=1e-3)
    assert run(0.35, (0.96, 0.965))[0] == []  # under the official 0.97


# ----------------------------------------------------------------------------------------------- deploy.engines
class _Tiny(nn.Linear):
    """A stand-in model: a few tensors and the options the cache reads."""

    def __init__(self, options: dict | None = None, seed: int = 0):
        super().__init__(3, 2)
        self.options = options or {"type": "VQFRv2", "base_channels": 8}
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            self.weight.copy_(torch.randn(2, 3, generator=g))
            self.bias.copy_(torch.randn(2, generator=g))


class _Exporters:
    """export.onnx / export.trt / export.aoti as EngineCache calls them; ``export_onnx`` reads the weights file as
    the real one does (through the cache's ``weights_file``)."""

    def __init__(self):
        self.BuildOptions = lambda **kw: kw

    @staticmethod
    def _write(path, what):
        path.write_text(what)
        path.with_name(path.name + ".json").write_text("{}")
        return path

    def export_onnx(self, weights, path, config, precision):
        assert weights.is_file()
        return self._write(path, f"onnx {precision}")

    def build_engine(self, onnx_path, path, options):
        return self._write(path, "engine")

    def export_aoti(self, weights, path, config, precision, device):
        return self._write(path, f"aoti {device}")


@pytest.fixture
def engines(monkeypatch):
    from deploy import engines

    monkeypatch.setattr(engines, "_exporter", lambda module: _Exporters())
    return engines


def test_engine_file_names_follow_the_documented_scheme(tmp_path, engines):
    """``{arch}-{first 12 hex digits of the checkpoint's sha256}-{kind}-{precision}[-b{max batch}|-{device}]``:
    the name is the whole cache key, so each part must be there."""
    model = _Tiny()
    weights = tmp_path / "user.safetensors"
    weights.write_bytes(b"any checkpoint bytes")
    digest = hashlib.sha256(b"any checkpoint bytes").hexdigest()[:12]
    cache = engines.EngineCache(tmp_path / "engines", model, weights)
    assert cache.onnx("fp16")[0].name == f"VQFRv2-{digest}-onnx-fp16.onnx"
    assert cache.tensorrt("fp16", 4)[0].name == f"VQFRv2-{digest}-trt-fp16-b4.engine"
    assert cache.aoti("fp32", torch.device("cpu"))[0].name == f"VQFRv2-{digest}-aoti-fp32-cpu.pt2"


def test_random_weights_keep_one_digest_after_their_file_is_written(tmp_path, engines):
    """Random weights are digested from their tensors because their saved file's bytes change from run to run. Once
    the first export has written that file, later engines of the same run must keep the same digest (a digest of the
    file would name them differently in every run, and rebuild them every time)."""
    folder = tmp_path / "engines"
    cache = engines.EngineCache(folder, _Tiny(), None)
    first, _ = cache.onnx("fp32")
    assert cache.weights_file().is_file()
    second, _ = cache.onnx("fp16")
    assert re.fullmatch(r"VQFRv2-[0-9a-f]{12}-onnx-fp32\.onnx", first.name)
    assert second.name == first.name.replace("fp32", "fp16")
    again = engines.EngineCache(folder, _Tiny(), None)  # the next run: everything reused
    assert again.onnx("fp16") == (second, None) and again.onnx("fp32") == (first, None)


def test_random_weights_digest_covers_the_options(tmp_path, engines):
    """The options go to the exporter (``config=``) with the tensors: the same tensors under other options are
    another engine."""
    a = engines.EngineCache(tmp_path, _Tiny(), None).digest()
    b = engines.EngineCache(tmp_path, _Tiny({"type": "VQFRv2", "base_channels": 16}), None).digest()
    c = engines.EngineCache(tmp_path, _Tiny(seed=1), None).digest()
    assert re.fullmatch(r"[0-9a-f]{12}", a) and len({a, b, c}) == 3


def test_a_missing_exporter_module_is_backend_unavailable():
    from deploy import engines

    with pytest.raises(BackendUnavailable, match=r"export/no_such_exporter\.py.*Fix: use a checkout that has export/"):
        engines._exporter("no_such_exporter")


# ----------------------------------------------------------------------------------------------- deploy.cpu_latency
class _Clock:
    """Scripted clocks for ``deploy.cpu_latency``: each model call advances wall and process time by the next
    scripted amounts."""

    def __init__(self, steps: list[tuple[float, float]]):
        self.wall = self.cpu = 0.0
        self.steps = list(steps)
        self.module = types.SimpleNamespace(perf_counter=lambda: self.wall, process_time=lambda: self.cpu)

    def tick(self):
        dw, dc = self.steps.pop(0)
        self.wall += dw
        self.cpu += dc


def test_time_model_reports_the_median_without_autograd(monkeypatch):
    """Three timed runs of 1, 2 and 9 s wall (0.5, 3, 0.25 s CPU) after one warm-up of 100 s: the medians are 2 and
    0.5 (the means would be 4 and 1.25); the model runs with autograd off."""
    from deploy import cpu_latency

    clock = _Clock([(100.0, 100.0), (1.0, 0.5), (2.0, 3.0), (9.0, 0.25)])
    monkeypatch.setattr(cpu_latency, "time", clock.module)
    grad = []

    def model(x, **kw):
        grad.append(torch.is_grad_enabled())
        clock.tick()

    wall, cpu = cpu_latency.time_model(model, torch.zeros(1), {}, iters=3, warmup=1)
    assert (wall, cpu) == (2.0, 0.5) and grad == [False] * 4


def test_cpu_latency_labels_rows_with_the_fidelity_they_ran_and_sets_the_threads(monkeypatch, capsys):
    """Default arguments: 2 threads given to torch, the median of 3 runs after 1 warm-up, said in the header; the
    fidelity 1.0 run (5 s each) is the row labelled 1.0, the fidelity 0.0 run (1 s) the row labelled 0.0."""
    import vqfr
    from deploy import cpu_latency

    walls = {1.0: 5.0, 0.0: 1.0}
    clock = _Clock([])
    monkeypatch.setattr(cpu_latency, "time", clock.module)

    class Fake(nn.Module):
        def forward(self, x, fidelity=None):
            clock.steps.append((walls[fidelity], walls[fidelity] / 10))
            clock.tick()
            return x

    threads = []
    monkeypatch.setattr(vqfr, "build_model", lambda *a, **k: Fake())
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    cpu_latency.main(["--size", "8"])
    out = capsys.readouterr().out
    assert threads == [2]
    assert ", 2 threads, " in out and "1x3x8x8 fp32, median of 3 after 1 warm-up" in out
    assert "| VQFRv2 | 1.0 | 5.00 | 0.50 |" in out and "| VQFRv2 | 0.0 | 1.00 | 0.10 |" in out


def test_cpu_latency_refuses_a_negative_warm_up(monkeypatch, capsys):
    """``--warmup -1 --iters 1`` ran ``range(0)``: no timed run, and statistics.median raised StatisticsError after
    the model was built (``--warmup -1 --iters 3`` silently timed 2 runs). Refused as a usage error instead."""
    import vqfr
    from deploy import cpu_latency

    monkeypatch.setattr(vqfr, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(SystemExit) as exc:
        cpu_latency.main(["--warmup", "-1", "--iters", "1"])
    assert exc.value.code == 2 and "--warmup must be at least 0, got -1" in capsys.readouterr().err

"""What mutation testing (round 4) of training/data.py, export/trt.py, export/source.py and export/metadata.py found
unchecked, pinned here (each expected value computed independently, on tiny inputs, on the CPU):

- training data: upper-case suffixes, ``.jpeg`` and folders named like images in ``list_images``; the first usable
  data root; ``synthetic:N`` holding N faces and synthetic faces depending on their seed; a folder whose name
  merely starts with ``synthetic`` read as a folder, and a bad ``synthetic:`` count refused (two defects this round
  found and fixed); 8-bit files mapped exactly
  onto [-1, 1] in RGB; tall faces refused like wide ones; larger faces shrunk by area averaging; an unreadable face
  replaced by another file (never itself, and not by the same one every epoch), reported as JSON
  ``[[file, reason]]``; exactly ``MAX_DRAWS`` tries and an error naming three files with " ..." only when there
  were more; validation pairs keeping their names and synthesised inputs when a bad file is left out, and
  ``max_images`` taking the first files; sampler permutations distinct for every (seed, epoch), its length after a
  resume, its unshuffled order; flips with probability 0.5, on by default;
- the TensorRT build, on a stand-in tensorrt module: weakly against strongly typed networks on TensorRT 10 and 11
  (creation flag, FP16/OBEY flags, the refusal of ``--fp16`` on TensorRT 11), TF32 off, the workspace in GiB, the
  timing cache created when absent, loaded when present, refused on a mismatch and saved; the engine's sidecar
  (precision, ``dcn_precision``, TensorRT version, profile, the ONNX's name, no stale ``check``, the serialised
  plugin libraries); the profile's batch edges and a batch of 0; a v1 ONNX's own patch size; a folder given as ONNX
  or reference; a timing cache on the engine's sidecar; ``--check``'s feeds, its opt batch, its fp32 tolerance
  scaled by the output's peak, NaN fp16 outputs failing, and CLI samples read at ``--size``;
- the exporters' source and sidecar: the random-weight distributions, an output whose sidecar would overwrite an
  input, ``~`` in config paths, a sidecar path that is a folder, lower-case ``.pt2``, ``load_source_model``'s
  defaults and refusals, the traced batch of 2 and the shared batch Dim, v1 side checks and their fix (the nearest
  side, a defect fixed), the shape checks of ``export_spec``, clamped and seeded check inputs, the ``--batch``
  parser, torch's version with its build tag, ``gpu_info`` of the asked device, and what ``engine_meta`` records.

TensorRT is never needed (its module is faked); polygraphy, when missing, skips the ``--check`` tests only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from export import metadata, source
from export import trt as trt_export
from tests.conftest import TINY_V1, TINY_V2, seeded_model
from tests.fake_tensorrt import STRONGLY_TYPED_BIT, BuildLog, fake_tensorrt
from training.data import EpochSampler, FaceDataset, PairedDataset, list_images, resolve_root, synthetic_face
from vqfr.errors import ConfigError, EngineError, InputError, OutputError
from vqfr.sidecar import EngineMeta, TensorSpec, read_sidecar, sidecar_path, write_sidecar


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors; two threads only spin on a busy 2-core machine


# --- training/data.py -------------------------------------------------------------------------------------------------
def _write_png(path: Path, img: np.ndarray) -> Path:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return path


def _cut_off_png(path: Path) -> Path:
    """A PNG cut off after 40 bytes, as by an interrupted copy."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()[:40])
    return path


def test_list_images_takes_upper_case_suffixes_and_jpeg_and_skips_folders_named_like_images(tmp_path):
    """Camera and Windows copies are named ``.JPG``/``.PNG``; ``.jpeg`` is as common as ``.jpg``; a folder named
    ``batch.png`` is not an image."""
    face = np.full((8, 8, 3), 128, np.uint8)
    for name in ("a.PNG", "b.jpeg", "c.JPG", "d.png"):
        _write_png(tmp_path / name, face) if name.lower().endswith("png") else _write_jpg(tmp_path / name, face)
    (tmp_path / "e.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.PNG", "b.jpeg", "c.JPG", "d.png"]


def _write_jpg(path: Path, img: np.ndarray) -> Path:
    import cv2

    path.write_bytes(cv2.imencode(".jpg", img)[1].tobytes())  # imwrite picks the codec by the lower-case suffix
    return path


def test_resolve_root_takes_the_first_usable_candidate(tmp_path):
    (tmp_path / "local").mkdir()
    (tmp_path / "shared").mkdir()
    assert resolve_root([str(tmp_path / "missing"), str(tmp_path / "local"), str(tmp_path / "shared"),
                         "synthetic:4"]) == str(tmp_path / "local")
    assert resolve_root(["synthetic:3", str(tmp_path / "local")]) == "synthetic:3"


def test_a_synthetic_root_holds_the_faces_it_names():
    """``synthetic:N`` is N faces; bare ``synthetic`` is accepted, with the default count."""
    from training import data

    assert len(FaceDataset("synthetic:5", 8)) == 5 and len(FaceDataset("synthetic:1", 8)) == 1
    assert len(FaceDataset("synthetic", 8)) == data.SYNTHETIC_DEFAULT_COUNT


def test_a_data_root_whose_name_starts_with_synthetic_is_a_folder(tmp_path, monkeypatch):
    """Only ``synthetic`` and ``synthetic:N`` are procedural faces (the module docstring). A folder named
    ``synthetic_faces`` was taken for 16 procedural faces and never read, and a missing ``synthetic_data`` was
    accepted as a root (found by mutation testing, round 4)."""
    monkeypatch.chdir(tmp_path)
    for i in range(3):
        _write_png(tmp_path / "synthetic_faces" / f"{i}.png", np.full((8, 8, 3), 60 * i, np.uint8))
    ds = FaceDataset("synthetic_faces", 8, use_hflip=False)
    assert len(ds) == 3
    first = ds[0]["gt"]  # the file's flat 0-valued image in [-1, 1], not a procedural face
    assert torch.equal(first, torch.full_like(first, -1.0))
    assert resolve_root(["synthetic_backup", "synthetic_faces", "synthetic:2"]) == "synthetic_faces"
    with pytest.raises(ConfigError, match="none of the data roots"):
        resolve_root("synthetic_data")


@pytest.mark.parametrize("root", ["synthetic:", "synthetic:x", "synthetic:-3", "synthetic:0", "synthetic:2.5"])
def test_a_synthetic_count_that_is_not_a_positive_integer_is_refused_by_name(root):
    """``synthetic:x`` raised int()'s bare ValueError and ``synthetic:-3`` a negative __len__ error."""
    with pytest.raises(ConfigError, match=r"dataroot_gt: .*positive whole number.*Fix: write for example"):
        resolve_root(root)
    with pytest.raises(ConfigError, match="positive whole number"):
        FaceDataset(root, 8)


def test_synthetic_faces_depend_on_the_seed():
    """Deterministic in (index, seed), and the seed matters."""
    assert np.array_equal(synthetic_face(2, 16, seed=1), synthetic_face(2, 16, seed=1))
    assert not np.array_equal(synthetic_face(2, 16, seed=1), synthetic_face(2, 16, seed=2))


def test_training_faces_read_from_files_span_minus_one_to_one_exactly(tmp_path):
    """An 8-bit file maps v -> v / 255 * 2 - 1: white is exactly 1 and black exactly -1 (not 255/256 ...)."""
    img = np.zeros((8, 8, 3), np.uint8)
    img[:, 4:] = 255
    img[0, 0] = (51, 102, 204)  # BGR: the model takes RGB
    _write_png(tmp_path / "faces" / "f.png", img)
    gt = FaceDataset(str(tmp_path / "faces"), 8, use_hflip=False)[0]["gt"]
    assert float(gt.min()) == -1.0 and float(gt.max()) == 1.0
    torch.testing.assert_close(gt[:, 0, 0], torch.tensor([204, 102, 51]) / 255 * 2 - 1)


def test_only_square_faces_are_taken_tall_ones_too(tmp_path):
    """Training faces are square, aligned crops: a tall file is refused like a wide one (and replaced)."""
    _write_png(tmp_path / "faces" / "tall.png", np.zeros((12, 8, 3), np.uint8))
    ds = FaceDataset(str(tmp_path / "faces"), 8, use_hflip=False)
    with pytest.raises(InputError, match=r"tall.png: is 8x12; training faces must be square"):
        ds.source.read(0)


def test_larger_faces_are_shrunk_with_area_averaging(tmp_path):
    """A face above ``out_size`` is shrunk with INTER_AREA (each output pixel the mean of its 4x4 block here), not
    sampled bilinearly (which at 4x reads 2 of every 4 rows and columns and aliases fine texture)."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    _write_png(tmp_path / "faces" / "f.png", img)
    gt = FaceDataset(str(tmp_path / "faces"), 8, use_hflip=False)[0]["gt"]
    blocks = img.astype(np.float64).reshape(8, 4, 8, 4, 3).mean(axis=(1, 3)) / 255.0  # BGR [8, 8, 3]
    expected = torch.from_numpy(blocks[:, :, ::-1].transpose(2, 0, 1).copy()).float() * 2 - 1
    torch.testing.assert_close(gt, expected, atol=1.5 / 255, rtol=0)


def test_an_unreadable_face_is_replaced_by_another_file_and_reported_as_file_and_reason(tmp_path):
    """In a folder of one good and one cut-off file, the replacement of the bad one is the other file at the first
    draw, for every epoch: ``skipped`` is the JSON list ``[[file, reason]]`` with that one entry."""
    good = _write_png(tmp_path / "faces" / "a.png", np.full((8, 8, 3), 200, np.uint8))
    bad = _cut_off_png(tmp_path / "faces" / "b.png")
    ds = FaceDataset(str(tmp_path / "faces"), 8, use_hflip=False)
    assert [p.name for p in ds.source.files] == [good.name, bad.name]
    for epoch in range(6):
        ds.set_epoch(epoch)
        item = ds[1]
        skipped = json.loads(item["skipped"])
        assert len(skipped) == 1 and skipped[0][0] == str(bad), skipped
        assert isinstance(skipped[0][1], str) and skipped[0][1], skipped  # the reason
        torch.testing.assert_close(item["gt"], torch.full((3, 8, 8), 200 / 255 * 2 - 1))


def test_the_replacement_of_an_unreadable_face_changes_with_the_epoch(tmp_path):
    """The replacement is drawn at random for each (seed, epoch, index): over epochs a bad file is replaced by
    various faces, not by the same one every epoch (which would show that face twice in every epoch)."""
    for value in range(5):
        _write_png(tmp_path / "faces" / f"{value}.png", np.full((8, 8, 3), 40 * value, np.uint8))
    _cut_off_png(tmp_path / "faces" / "9_cut.png")
    ds = FaceDataset(str(tmp_path / "faces"), 8, use_hflip=False)
    replacements = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        replacements.add(float(ds[5]["gt"].mean()))
    assert len(replacements) >= 3, replacements


def test_a_sample_gives_up_after_max_draws_files_naming_three_and_an_ellipsis(tmp_path, monkeypatch):
    """Exactly MAX_DRAWS files are tried; the error names the first three distinct files and adds " ..." when
    there were more (and not with exactly three)."""
    from training import data

    for count, more in ((5, True), (3, False)):
        folder = tmp_path / f"bad{count}"
        for i in range(count):
            _cut_off_png(folder / f"{i}.png")
        ds = FaceDataset(str(folder), 8, use_hflip=False)
        tried = []
        read = ds.source.read
        monkeypatch.setattr(ds.source, "read", lambda index, read=read, tried=tried: tried.append(index) or read(index))
        with pytest.raises(InputError, match="10 training images drawn in a row could not be read") as err:
            ds[0]
        assert len(tried) == data.MAX_DRAWS == 10
        message = str(err.value)
        named = {p.name for p in folder.iterdir() if str(p) in message}
        assert len(named) == 3 and message.count(".png: ") == 3, message
        assert (" ...)" in message) == more, message


def test_validation_pairs_keep_their_names_and_inputs_when_a_bad_file_is_left_out(tmp_path):
    """``drop_unreadable`` leaves a file out of the set: the remaining items keep their own names and the same
    synthesised LQ as before (every validation scores the same inputs); ``max_images`` takes the first files."""
    from training.degradations import PRESETS

    folder = tmp_path / "val"
    for i in range(3):
        _write_png(folder / f"f{i}.png", synthetic_face(i, 16))
    before = PairedDataset(str(folder), 16, degradation=PRESETS["v2"], seed=5)
    lq = {before[i]["name"]: before[i]["lq"] for i in range(3)}
    assert [PairedDataset(str(folder), 16, max_images=2)[i]["name"] for i in range(2)] == ["f0", "f1"]
    _cut_off_png(folder / "f0.png")
    after = PairedDataset(str(folder), 16, degradation=PRESETS["v2"], seed=5)
    assert list(after.drop_unreadable()) == [str(folder / "f0.png")]
    assert [after[i]["name"] for i in range(len(after))] == ["f1", "f2"]
    for i in range(2):
        assert torch.equal(after[i]["lq"], lq[after[i]["name"]])


def test_sampler_permutations_differ_for_every_seed_and_epoch():
    """The permutation of epoch e uses (seed, e): no two (seed, epoch) pairs share one (seed 0 epoch 1 and seed 1
    epoch 0 included)."""
    orders = set()
    for seed in range(4):
        for epoch in range(4):
            sampler = EpochSampler(40, 40, seed=seed)
            sampler.set_epoch(epoch)
            orders.add(tuple(next(iter(sampler))))
    assert len(orders) == 16


def test_sampler_length_counts_the_batches_left_after_a_resume_and_keeps_file_order_unshuffled():
    """``len`` is what the DataLoader and the epoch's progress use: the batches still to come after
    ``set_epoch(e, start_batch)``. ``shuffle=False`` yields the files in order."""
    sampler = EpochSampler(10, 3)
    sampler.set_epoch(1, start_batch=1)
    assert len(sampler) == 2 == len(list(sampler))
    plain = EpochSampler(10, 2, world_size=2, rank=1, shuffle=False)
    plain.set_epoch(4)
    assert list(plain) == [[2, 3], [6, 7]]


def test_faces_are_flipped_with_probability_one_half():
    """``use_hflip``: each face is flipped with probability 0.5 (2000 draws: 0.5 +- 0.035, over 3 standard
    errors; 0.4 or 0.6 would be 9 away)."""
    ramp = np.tile(np.linspace(0, 1, 4, dtype=np.float32)[None, :, None], (4, 1, 3))  # brighter to the right
    ds = FaceDataset("synthetic:2000", 4, seed=11)
    ds.source.read = lambda index: ramp
    flipped = sum(float(ds[i]["gt"][0, 0, 0]) > 0 for i in range(2000))
    assert abs(flipped / 2000 - 0.5) < 0.035, flipped


def test_face_dataset_flips_by_default():
    """``use_hflip`` defaults to True, as ``datasets.train.use_hflip`` does for the trainer: about half the faces
    come flipped."""
    flipped = FaceDataset("synthetic:40", 8)
    plain = FaceDataset("synthetic:40", 8, use_hflip=False)
    n = sum(not torch.equal(flipped[i]["gt"], plain[i]["gt"]) for i in range(40))
    assert 8 <= n <= 32


# --- export/trt.py: the build on a stand-in tensorrt module -----------------------------------------------------------
def _onnx_with_sidecar(folder: Path, precision: str, face_size: int = 16) -> Path:
    """A stand-in v2 ONNX file (dynamic batch) with its sidecar, as export.onnx writes them; its sidecar carries
    the ONNX export's own --check result, which does not describe an engine."""
    onnx_path = folder / "m.onnx"
    onnx_path.write_bytes(b"graph " + precision.encode())
    write_sidecar(onnx_path, EngineMeta(
        arch="VQFRv2", options={"type": "VQFRv2"}, face_size=face_size, precision=precision,
        inputs=(TensorSpec("input", (-1, 3, face_size, face_size)), TensorSpec("fidelity", (-1,))),
        outputs=(TensorSpec("output", (-1, 3, face_size, face_size)),), opset=20, built_with={"torch": "2.13.0"},
        extra={"dynamic_batch": True, "check": {"sample": {"psnr_db": 60.0}}}))
    return onnx_path


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """``build(version, precision, options)``: build_engine on a stand-in tensorrt of that version, from a stand-in
    ONNX of that precision; returns (the recorder, the engine's sidecar)."""

    def build(version: str, precision: str, options: trt_export.BuildOptions):
        recorder = BuildLog()
        module = fake_tensorrt(version, recorder, {"input": (-1, 3, 16, 16), "fidelity": (-1,)})
        monkeypatch.setitem(sys.modules, "tensorrt", module)
        monkeypatch.setattr(trt_export, "_onnx_bytes", lambda path, meta, opts: (b"graph", set()))
        folder = tmp_path / f"{version}_{precision}_{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        engine = trt_export.build_engine(_onnx_with_sidecar(folder, precision), folder / "m.engine", options)
        assert engine.read_bytes() == b"engine"
        return recorder, read_sidecar(engine)

    return build


def test_a_weakly_typed_fp16_build_sets_the_builder_and_its_sidecar_as_documented(fake_build, tmp_path):
    """TensorRT 10, an fp32 ONNX with ``--fp16``: a weakly typed network (no STRONGLY_TYPED flag) with the FP16 and
    OBEY_PRECISION_CONSTRAINTS flags, TF32 off, the workspace in GiB (1 << 30 bytes each), the timing cache
    created empty when its file does not exist yet, refused on a version/GPU mismatch and saved after the build.
    The sidecar says fp16, records the TensorRT version, the ONNX file's name and the profile, and drops the ONNX's
    own ``check`` result (it does not describe the engine)."""
    cache = tmp_path / "trt.cache"  # not there yet: "load (if present) and save"
    options = trt_export.BuildOptions(fp16=True, min_batch=1, opt_batch=2, max_batch=4, workspace_gb=0.5,
                                      timing_cache=cache)
    recorder, meta = fake_build("10.8.0.43", "fp32", options)
    assert recorder.network_flags == 0
    assert recorder.set_flags == {"FP16", "OBEY"} and recorder.cleared_flags == {"TF32"}
    assert recorder.pool_limits == {"WORKSPACE": 2 ** 29}
    assert recorder.cache_data == b"" and recorder.ignore_mismatch is False
    assert cache.read_bytes() == b"tuned after "
    assert meta.precision == "fp16" and meta.built_with["tensorrt"] == "10.8.0.43"
    assert meta.built_with["torch"] == "2.13.0"  # the ONNX export's entries are kept
    extra = meta.extra
    assert extra["source_onnx"] == "m.onnx" and "check" not in extra
    assert extra["strongly_typed"] is False and extra["dcn_precision"] == "fp32" and extra["tf32"] is False
    assert extra["profile"] == {"input": [[1, 3, 16, 16], [2, 3, 16, 16], [4, 3, 16, 16]],
                                "fidelity": [[1], [2], [4]]}
    assert recorder.profile == {"input": ((1, 3, 16, 16), (2, 3, 16, 16), (4, 3, 16, 16)),
                                "fidelity": ((1,), (2,), (4,))}


def test_an_existing_timing_cache_is_loaded_from_its_file(fake_build, tmp_path):
    cache = tmp_path / "trt.cache"
    cache.write_bytes(b"earlier tactics")
    recorder, _ = fake_build("10.8.0.43", "fp32", trt_export.BuildOptions(timing_cache=cache))
    assert recorder.cache_data == b"earlier tactics" and cache.read_bytes() == b"tuned after earlier tactics"


def test_an_fp16_onnx_builds_a_strongly_typed_network_on_tensorrt_10(fake_build):
    """An fp16 ONNX obeys the precisions written in the graph: TensorRT 10 needs the STRONGLY_TYPED creation flag,
    and the FP16 builder flag and precision constraints are not set (they belong to weakly typed builds), even
    with ``--fp16``. ``--dcn-fp16`` on an fp16 engine is recorded as fp16 DeformConvs."""
    recorder, meta = fake_build("10.8.0.43", "fp16", trt_export.BuildOptions(fp16=True, dcn_fp16=True))
    assert recorder.network_flags == 1 << STRONGLY_TYPED_BIT
    assert not recorder.set_flags & {"FP16", "OBEY"}
    assert meta.precision == "fp16" and meta.extra["strongly_typed"] is True
    assert meta.extra["dcn_precision"] == "fp16" and meta.extra["layers_pinned_fp32"] == 0


def test_tensorrt_11_networks_are_strongly_typed_without_the_creation_flag(fake_build):
    """TensorRT 11 builds strongly typed networks only (the creation flag is TensorRT 10's): an fp32 ONNX gives a
    strongly typed fp32 engine, an fp16 ONNX an fp16 one even with ``--fp16``; ``--fp16`` on an fp32 ONNX is
    refused, naming the fp16 export that replaces it."""
    recorder, meta = fake_build("11.0.0.1", "fp32", trt_export.BuildOptions())
    assert recorder.network_flags == 0 and meta.extra["strongly_typed"] is True and meta.precision == "fp32"
    recorder, meta = fake_build("11.0.0.1", "fp16", trt_export.BuildOptions(fp16=True))
    assert recorder.network_flags == 0 and meta.precision == "fp16" and not recorder.set_flags & {"FP16", "OBEY"}
    with pytest.raises(ConfigError, match=r"TensorRT 11\.0\.0\.1 builds strongly typed networks only.*Fix: export "
                                          r"the ONNX with python -m export\.onnx --precision fp16"):
        fake_build("11.0.0.1", "fp32", trt_export.BuildOptions(fp16=True))


def test_an_fp32_engine_keeps_fp32_deform_convs_whatever_dcn_fp16_says(fake_build):
    """``--dcn-fp16`` only lets the plugin run in fp16 inside an fp16 engine: an fp32 engine records fp32 DCNs.
    ``--tf32`` leaves TF32 on; ``--version-compatible`` sets its flag and serialises the parser's plugin
    libraries into the engine, which its sidecar lists."""
    options = trt_export.BuildOptions(dcn_fp16=True, tf32=True, version_compatible=True)
    recorder, meta = fake_build("10.8.0.43", "fp32", options)
    assert meta.precision == "fp32" and meta.extra["dcn_precision"] == "fp32" and meta.extra["tf32"] is True
    assert "TF32" not in recorder.cleared_flags and "VERSION_COMPATIBLE" in recorder.set_flags
    assert recorder.plugins_to_serialize == ["libnvinfer_vc_plugin.so.10"]
    assert meta.extra["serialized_plugin_libraries"] == ["libnvinfer_vc_plugin.so.10"]
    assert meta.extra["version_compatible"] is True


def test_build_options_accept_the_edges_of_the_profile_and_refuse_a_batch_of_0():
    """``1 <= min-batch <= opt-batch <= max-batch``: equal bounds are a valid (fixed-batch) profile."""
    for low, opt, high in ((1, 8, 8), (4, 4, 4), (1, 1, 1)):
        trt_export.BuildOptions(min_batch=low, opt_batch=opt, max_batch=high).validate()
    with pytest.raises(ConfigError, match=r"need 1 <= min-batch .* got 0, 1, 8"):
        trt_export.BuildOptions(min_batch=0).validate()


def test_a_dynamic_v1_onnx_is_checked_against_its_own_patch_size(tmp_path):
    """``--size`` must be a multiple of the graph's ``proj_patch_size`` (from its sidecar), not of a fixed 32."""
    onnx_path = tmp_path / "v1.onnx"
    onnx_path.write_bytes(b"graph")
    write_sidecar(onnx_path, EngineMeta(
        arch="VQFRv1", options={"type": "VQFRv1", "proj_patch_size": 16}, face_size=64, precision="fp32",
        inputs=(TensorSpec("input", (-1, 3, -1, -1)),), outputs=(TensorSpec("output", (-1, 3, -1, -1)),)))
    assert trt_export._engine_sidecar(onnx_path, trt_export.BuildOptions(size=48)).face_size == 48
    with pytest.raises(ConfigError, match=r"multiple of 16, got 40.*Fix: pass --size 32"):
        trt_export._engine_sidecar(onnx_path, trt_export.BuildOptions(size=40))


def test_build_refuses_an_onnx_or_reference_that_is_a_folder_as_not_a_file(tmp_path):
    """A folder given for the ONNX or for ``--reference-onnx`` is 'not a file' (not 'does not exist', which would
    send the user looking for a missing path), before TensorRT is touched."""
    folder = tmp_path / "exports.onnx"
    folder.mkdir()
    with pytest.raises(EngineError, match=r"exports.onnx: is not a file"):
        trt_export._engine_sidecar(folder, trt_export.BuildOptions())
    onnx_path = _onnx_with_sidecar(tmp_path, "fp32")
    with pytest.raises(EngineError, match=r"exports.onnx: is not a file. Fix: pass --reference-onnx"):
        trt_export.build_engine(onnx_path, tmp_path / "m.engine", check=True, reference_onnx=folder)


def test_build_refuses_a_timing_cache_on_the_engines_sidecar(tmp_path):
    """The engine's sidecar is written after the cache: ``--timing-cache m.engine.json`` would lose the cache."""
    onnx_path = _onnx_with_sidecar(tmp_path, "fp32")
    output = tmp_path / "m.engine"
    with pytest.raises(ConfigError, match=r"m.engine.json: the timing cache would be overwritten by the engine or "
                                          r"its sidecar"):
        trt_export.build_engine(onnx_path, output, trt_export.BuildOptions(timing_cache=sidecar_path(output)))


def test_check_feeds_cycle_through_the_samples_with_fidelities_from_0_to_1():
    """Samples are repeated in order up to the batch (not the first one only); the random inputs span [-1, 1];
    the sample fidelities run from 0 to 1 across the batch, covering both branches of v2."""
    samples = [np.full((3, 8, 8), v, np.float32) for v in (-0.5, 0.25)]
    feeds = trt_export._check_feeds(_engine_meta("fp32"), 3, 8, samples)
    assert [float(image.mean()) for image in feeds["sample"]["input"]] == [-0.5, 0.25, -0.5]
    np.testing.assert_array_equal(feeds["sample"]["fidelity"], [0.0, 0.5, 1.0])
    random = feeds["random"]["input"]
    assert random.shape == (3, 3, 8, 8) and random.min() < -0.5 and random.max() > 0.5
    assert random.min() >= -1 and random.max() <= 1


def _engine_meta(precision: str, profile: dict | None = None) -> EngineMeta:
    return EngineMeta(arch="VQFRv2", options={}, face_size=8, precision=precision,
                      inputs=(TensorSpec("input", (-1, 3, 8, 8)), TensorSpec("fidelity", (-1,))),
                      outputs=(TensorSpec("output", (-1, 3, 8, 8)),), extra={"profile": profile or {}})


@pytest.fixture
def fake_comparison(monkeypatch):
    """``compare(meta, error, scale)``: trt._compare where onnxruntime returns ``scale`` x the input and TensorRT
    that plus ``error``; returns (its result, the batch of the feeds)."""
    pytest.importorskip("polygraphy")
    from polygraphy import comparator
    from polygraphy.backend import onnxrt, trt

    class Runner:
        def __init__(self, name, loader):
            self.name = name

    seen = {}

    def run(runners, data_loader):
        seen["batch"] = [feed["input"].shape[0] for feed in data_loader]
        ort = [{"output": seen_scale[0] * feed["input"]} for feed in data_loader]
        return {runners[0].name: [{"output": o["output"] + seen_error[0]} for o in ort], runners[1].name: ort}

    seen_error, seen_scale = [0.0], [1.0]
    monkeypatch.setattr(trt, "TrtRunner", lambda loader: Runner("trt", loader))
    monkeypatch.setattr(trt, "EngineFromBytes", lambda data: data)
    monkeypatch.setattr(onnxrt, "OnnxrtRunner", lambda loader: Runner("ort", loader))
    monkeypatch.setattr(onnxrt, "SessionFromOnnx", lambda path, providers: path)
    monkeypatch.setattr(comparator, "Comparator", types.SimpleNamespace(run=run))

    def compare(meta, error, scale=1.0, path=Path("m.engine")):
        seen_error[0], seen_scale[0] = error, scale
        found = trt_export._compare(b"engine", meta, Path("m.onnx"), None, (), path)
        return found, seen["batch"]

    return compare


def test_check_runs_the_profiles_opt_batch(fake_comparison):
    profile = {"input": [[1, 3, 8, 8], [3, 3, 8, 8], [6, 3, 8, 8]], "fidelity": [[1], [3], [6]]}
    _, batches = fake_comparison(_engine_meta("fp32", profile), 0.0)
    assert batches == [3, 3]


def test_check_holds_fp32_engines_to_the_tolerance_times_the_outputs_peak(fake_comparison):
    """FP32_MAX_ABS x max(1, peak |output|): outputs of peak 10 (unclamped) may differ by up to 1e-2."""
    peak = 10.0  # the inputs span [-1, 1], so the outputs span [-10, 10]
    found, _ = fake_comparison(_engine_meta("fp32"), 0.5 * trt_export.FP32_MAX_ABS * peak, scale=peak)
    assert found["random"].max_abs == pytest.approx(0.5 * trt_export.FP32_MAX_ABS * peak, rel=1e-4)
    with pytest.raises(EngineError, match=r"m.engine: fp32 engine differs from onnxruntime on random inputs.*Fix: "
                                          r"build without --tf32"):
        fake_comparison(_engine_meta("fp32"), 2 * trt_export.FP32_MAX_ABS * peak, scale=peak)


def test_check_fails_an_fp16_engine_whose_outputs_are_nan(fake_comparison):
    """NaN outputs have a NaN PSNR, which is not ">= FP16_MIN_PSNR": the engine fails the check."""
    with pytest.raises(EngineError, match=r"fp16 engine too far from onnxruntime on random inputs"):
        fake_comparison(_engine_meta("fp16"), float("nan"))
    found, _ = fake_comparison(_engine_meta("fp16"), 1e-4)
    assert found["sample"].psnr_db > trt_export.FP16_MIN_PSNR


def test_cli_reads_the_check_samples_at_the_size_it_builds_for(tmp_path, monkeypatch):
    """With ``--size`` (a v1 ONNX of dynamic size) the samples are resized to that size, not the sidecar's face
    size, so they fit the engine's profile."""
    import cv2

    onnx_path = _onnx_with_sidecar(tmp_path, "fp32", face_size=32)
    face = tmp_path / "face.png"
    cv2.imwrite(str(face), np.zeros((20, 20, 3), np.uint8))
    seen = {}

    def build_engine(onnx, output, options, *, check, reference_onnx, samples):
        seen["shapes"] = [s.shape for s in samples]
        return output

    monkeypatch.setattr(trt_export, "build_engine", build_engine)
    assert trt_export.main([str(onnx_path), "-o", str(tmp_path / "m.engine"), "--check", "--size", "64",
                            "--samples", str(face)]) == 0
    assert seen["shapes"] == [(3, 64, 64)]


# --- export/source.py -------------------------------------------------------------------------------------------------
class _Randomised(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(32, 256, 3)  # fan-in 288
        self.norm = nn.GroupNorm(8, 256)
        self.embedding = nn.Embedding(512, 16)  # a codebook, like quantizer.embedding


def test_random_export_weights_follow_the_documented_distributions():
    """randomize_: conv/linear weights N(0, 1/fan_in), biases N(0, 0.05), norm scales 1 + N(0, 0.1), codebooks
    N(0, 1) (standard deviations checked to 15 %, on 256 to 73728 draws)."""
    model = source.randomize_(_Randomised(), seed=0).requires_grad_(False)
    assert float(model.conv.weight.std()) == pytest.approx(288 ** -0.5, rel=0.15)
    assert float(model.conv.bias.std()) == pytest.approx(0.05, rel=0.15)
    assert float(model.norm.bias.std()) == pytest.approx(0.05, rel=0.15)
    assert float(model.norm.weight.mean()) == pytest.approx(1.0, abs=0.03)
    assert float(model.norm.weight.std()) == pytest.approx(0.1, rel=0.15)
    assert float(model.embedding.weight.std()) == pytest.approx(1.0, rel=0.15)
    assert float(model.embedding.weight.mean()) == pytest.approx(0.0, abs=0.1)


def test_an_output_whose_sidecar_would_overwrite_an_input_is_refused(tmp_path):
    """``--config m.engine.json`` (a JSON config) with ``-o m.engine``: the sidecar written beside the output
    would replace the config."""
    config = tmp_path / "m.engine.json"
    config.write_text("{}")
    with pytest.raises(OutputError, match=r"m.engine.json: the output would overwrite the input"):
        source.refuse_overwriting_inputs(tmp_path / "m.engine", config)
    assert config.read_text() == "{}"


def test_a_config_path_with_a_tilde_is_the_file_in_the_home_folder():
    assert source.config_file("~/vqfr/cfg.yml") == Path.home() / "vqfr" / "cfg.yml"
    assert source.config_file("v2") is None and source.config_file({"type": "VQFRv2"}) is None


def test_an_output_is_refused_when_its_sidecar_path_is_a_folder(tmp_path):
    (tmp_path / "m.onnx.json").mkdir()
    with pytest.raises(OutputError, match=r"m.onnx: its sidecar m.onnx.json would be written over a folder"):
        source.check_output(tmp_path / "m.onnx", "onnxruntime")


def test_torch_packages_must_be_named_with_a_lower_case_pt2(tmp_path):
    """check_output compares suffixes as the backend table spells them: torch loads ``.pt2`` packages only."""
    with pytest.raises(ConfigError, match=r"m.PT2: .*Fix: name it m.pt2"):
        source.check_output(tmp_path / "m.PT2", "aoti")


def test_load_source_model_takes_exactly_one_source_and_defaults_random_weights_to_v2(monkeypatch):
    """Random weights without ``config`` build v2; the model comes back in eval mode without gradients; weights
    together with random weights are refused before anything is loaded."""
    asked = []
    models = {"v1": seeded_model(TINY_V1).train(), "v2": seeded_model(TINY_V2).train()}

    def build_model(config):
        asked.append(config)
        return models[config]

    monkeypatch.setattr(source.vqfr, "build_model", build_model)
    model = source.load_source_model(None, random_weights=3)
    assert asked == ["v2"] and model.options["type"] == "VQFRv2"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="pass exactly one of weights and random_weights"):
        source.load_source_model("VQFR_v2.pth", random_weights=3)


def test_a_dynamic_batch_is_traced_at_batch_2_and_shared_by_both_inputs():
    """torch.export specialises batches 0 and 1, so the example batch is 2; the batch Dim starts at 1 and is the
    same object for ``input`` and ``fidelity`` (one batch); a dynamic size marks H and W -1 in the sidecar."""
    spec = source.ExportSpec(None, 64, 64, False, True)
    image, fidelity = spec.example_inputs()
    assert image.shape == (2, 3, 64, 64) and fidelity.shape == (2,)
    shapes = spec.dynamic_shapes(32)
    assert shapes["fidelity"][0] is shapes["input"][0] and shapes["input"][0].min == 1
    inputs, outputs = source.ExportSpec(None, 64, 64, True, False).tensor_specs()
    assert [t.shape for t in inputs + outputs] == [(-1, 3, -1, -1)] * 2


def test_v1_sides_are_positive_multiples_of_the_patch_with_a_valid_fix():
    """One patch (32) is a valid side; below it the fix proposes the smallest valid side, not 0."""
    source.check_v1_side(32, 32)
    with pytest.raises(ConfigError, match=r"multiple of 32, got 10.*Fix: pass --size 32\b"):
        source.check_v1_side(10, 32)
    with pytest.raises(ConfigError, match=r"multiple of 32, got 100.*Fix: pass --size 96\b"):
        source.check_v1_side(100, 32)
    # the nearest valid side, as the docstring promises: 128 is 8 from 120, 96 is 24 (it proposed 96, rounding down)
    with pytest.raises(ConfigError, match=r"got 120.*Fix: pass --size 128\b"):
        source.check_v1_side(120, 32)
    with pytest.raises(ConfigError, match=r"got 48.*Fix: pass --size 32\b"):  # a tie: the smaller side
        source.check_v1_side(48, 32)


def test_export_spec_checks_batch_size_and_dynamic_size_against_the_architecture(v1, v2):
    """A batch below 1 is refused; v1 defaults to 512 px and its dynamic size needs two blocks at the traced size;
    v2's grid fixes its size (2x2 codes of 32 px: 64 px) and refuses a dynamic size."""
    with pytest.raises(ConfigError, match="batch must be a positive integer or dynamic, got 0"):
        source.export_spec(v1, batch=0)
    assert source.export_spec(v1).face_size == 512 and source.export_spec(v1, batch=1).batch == 1
    with pytest.raises(ConfigError, match=r"must span at least two 32-pixel blocks, got 32.*pass --size 64"):
        source.export_spec(v1, size=32, dynamic_size=True)
    assert source.export_spec(v1, size=64, dynamic_size=True).dynamic_size
    assert source.export_spec(v2, size=64).face_size == 64
    with pytest.raises(ConfigError, match=r"takes 64x64 inputs, not 128"):
        source.export_spec(v2, size=128)
    with pytest.raises(ConfigError, match="its input size cannot be dynamic"):
        source.export_spec(v2, dynamic_size=True)


def test_check_inputs_are_clamped_to_the_model_range_and_follow_the_seed():
    spec = source.ExportSpec(None, 16, 16, False, True)
    x, fidelity = source.check_inputs(spec, 3)
    assert x.shape == (3, 3, 16, 16) and float(x.min()) == -1.0 and float(x.max()) == 1.0  # the noise clips
    torch.testing.assert_close(fidelity, torch.tensor([0.0, 0.5, 1.0]))
    assert not torch.equal(source.check_inputs(spec, 3, seed=1)[0], x)
    assert torch.equal(source.check_inputs(spec, 3, seed=0)[0], x)


def test_the_batch_option_takes_positive_integers_or_dynamic():
    assert source._batch_arg("dynamic") is None and source._batch_arg("1") == 1
    for text in ("0", "-2"):
        with pytest.raises(argparse.ArgumentTypeError, match="batch must be at least 1"):
            source._batch_arg(text)


# --- export/metadata.py -----------------------------------------------------------------------------------------------
def test_package_versions_give_torchs_build_and_leave_out_missing_packages(monkeypatch):
    """torch's version is ``torch.__version__`` with its local build part (``+cpu``, ``+cu130``), which the
    distribution metadata of the CUDA wheels lacks (here a CUDA build is stood in for, so the metadata of the
    installed wheel cannot give the same answer); a package that is not installed is left out, not invented."""
    monkeypatch.setattr(torch, "__version__", "2.14.1+cu130")
    assert metadata.package_versions("torch", "no-such-distribution-vqfr") == {"torch": "2.14.1+cu130"}


def test_gpu_info_reads_the_asked_device_as_major_dot_minor(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 9) if device == 1 else (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"GPU {device}")
    assert metadata.gpu_info(1) == {"gpu": "GPU 1", "compute_capability": "8.9"}
    assert metadata.gpu_info() == {"gpu": "GPU 0", "compute_capability": "9.0"}


def test_engine_meta_records_the_weights_shapes_opset_and_input_range(v1, tmp_path):
    """The sidecar names the checkpoint file (not the path it was read from) with its sha256, or says that random
    weights are not a trained model and which seed made them; it records the opset, the [-1, 1] input range, the
    dynamic batch and size, and the exporter's extra details."""
    weights = tmp_path / "ckpt" / "VQFR_v1.pth"
    weights.parent.mkdir()
    weights.write_bytes(b"checkpoint bytes")
    spec = source.ExportSpec(None, 64, 64, True, False)
    meta = metadata.engine_meta(v1, spec, precision="fp32", weights=weights, opset=19, extra={"islands": 3})
    assert meta.weights_sha256 == hashlib.sha256(b"checkpoint bytes").hexdigest() and meta.opset == 19
    assert meta.extra == {"dynamic_batch": True, "dynamic_size": True, "input_range": [-1.0, 1.0],
                          "weights": "VQFR_v1.pth", "islands": 3}
    fixed = metadata.engine_meta(v1, source.ExportSpec(2, 64, 64, False, False), precision="fp32", weights=None,
                                 random_weights=7)
    assert fixed.weights_sha256 is None and fixed.opset is None
    assert fixed.extra["dynamic_batch"] is False and fixed.extra["dynamic_size"] is False
    assert "seed 7" in fixed.extra["weights"] and "NOT a trained model" in fixed.extra["weights"]

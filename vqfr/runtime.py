"""``vqfr.Runtime``: restore faces in photos with the fastest backend this machine offers for the given engine.

    import vqfr
    rt = vqfr.Runtime("VQFR_v2.pth")              # or model.onnx / model.engine / model.pt2 / an nn.Module
    restored = rt.restore("photo.jpg")             # BGR uint8, faces restored and pasted back
    face = rt.restore(aligned_face, aligned=True)  # exactly the model's output for an FFHQ-aligned face

Pipeline of :meth:`Runtime.restore` (DESIGN.md): load -> detect faces + 5 landmarks -> align each to the FFHQ
template at the model's face size -> restore all faces in batches -> paste back (inverse warp, soft mask) over the
Lanczos-upscaled background.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vqfr.backends.base import Availability, Backend, BackendEntry, availability, candidates, engine_kind
from vqfr.errors import BackendUnavailable, CheckpointError, ConfigError, EngineError, InputError
from vqfr.imaging import MAX_PIXELS, as_bgr_uint8, load_image, to_images, to_tensor, upscale_lanczos
from vqfr.sidecar import EngineMeta, read_sidecar, verify_engine_file

__all__ = ["Runtime", "Restoration", "RestoredFace", "find_weights", "WEIGHTS_ENV", "RELEASED_WEIGHTS"]

#: Environment variable naming a weights file, or a folder holding the released files.
WEIGHTS_ENV = "VQFR_WEIGHTS"
#: The released file names per version (the official demo's names first).
RELEASED_WEIGHTS = {"VQFRv1": ("VQFR_v1-33a1fac5.pth", "VQFR_v1.pth", "VQFR_v1.safetensors"),
                    "VQFRv2": ("VQFR_v2.pth", "VQFR_v2.safetensors")}
_ENGINE_SUFFIXES = (".onnx", ".engine", ".plan", ".pt2")
_RESTORERS = ("VQFRv1", "VQFRv2")

#: A background upsampler: (BGR uint8 [H,W,3], scale) -> BGR uint8 [int(H*scale), int(W*scale), 3].
Upsampler = Callable[[np.ndarray, float], np.ndarray]


@dataclasses.dataclass
class RestoredFace:
    """One face of a photo.

    Attributes:
        box: [4] float32 (x1, y1, x2, y2) in input pixels (the whole image for aligned inputs).
        score: detector confidence (1.0 for aligned inputs).
        landmarks: [5, 2] float32 in input pixels (for aligned inputs, the template carried back by ``affine``).
        affine: [2, 3] float64 input -> crop transform.
        cropped: [S, S, 3] uint8 BGR aligned crop fed to the model.
        restored: [S, S, 3] uint8 BGR model output.
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray
    affine: np.ndarray
    cropped: np.ndarray
    restored: np.ndarray


@dataclasses.dataclass
class Restoration:
    """The result for one input: the restored image and its faces (in detection order, highest score first)."""

    image: np.ndarray
    faces: list[RestoredFace]


def find_weights(arch: str = "VQFRv2") -> Path | None:
    """Where users keep the released weights, in this order: ``$VQFR_WEIGHTS`` (a file, or a folder holding
    the released file names), ``./experiments/pretrained_models/`` (the official demo's folder), ``./weights/``,
    ``$XDG_CACHE_HOME/vqfr`` (``~/.cache/vqfr`` when it is unset, empty or relative).

    Raises:
        ConfigError: ``$VQFR_WEIGHTS`` is set but names nothing that exists.
    """
    names = RELEASED_WEIGHTS.get(arch, ())
    env = os.environ.get(WEIGHTS_ENV)
    folders = []
    if env:
        path = Path(env).expanduser()
        if path.is_file():
            return path
        if not path.is_dir():
            raise ConfigError(f"${WEIGHTS_ENV} names {env!r}, which does not exist",
                              fix=f"point {WEIGHTS_ENV} at VQFR_v2.pth (or the folder holding it), or unset it")
        folders.append(path)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec: an unset, empty or relative value means ~/.cache (never a folder under the working directory).
    cache = (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "vqfr"
    folders += [Path("experiments/pretrained_models"), Path("weights"), cache]
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def _random_model(options: Any) -> nn.Module:
    from vqfr.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_model(options).eval()


def _banner(arch: str, engine: Path | None = None) -> str:
    """The warning for random weights: none found (``engine`` None), or an engine exported from random weights."""
    line = "!" * 100
    what = (f"NO WEIGHTS GIVEN OR FOUND. Using a RANDOM-WEIGHT {arch} (official architecture, seed 0)."
            if engine is None else f"{engine.name} WAS EXPORTED FROM RANDOM WEIGHTS (its sidecar says so), not "
            f"from a trained {arch}.")
    fix = ("pass the released weights (vqfr.Runtime('VQFR_v2.pth'), CLI --weights VQFR_v2.pth) or set "
           f"{WEIGHTS_ENV}=/path/to/VQFR_v2.pth" if engine is None else
           "export the released weights (python -m export.onnx --weights VQFR_v2.pth) and use that engine")
    return (f"\n{line}\n!!! vqfr: {what}\n"
            f"!!! Its output is MEANINGLESS: use it only to test the pipeline, never to judge restoration.\n"
            f"!!! Fix: {fix}.\n{line}\n")


class Runtime:
    """Restore faces with one engine on the fastest usable backend.

    Args:
        engine: ``.engine``/``.plan`` (TensorRT), ``.onnx`` (ONNX Runtime: TensorRT EP, CUDA EP, then CPU), ``.pt2``
            (AOTInductor), ``.pth``/``.safetensors`` (PyTorch; Triton kernels on CUDA), an ``nn.Module`` such as
            ``vqfr.load_model(...)`` returns, or None: the weights found by :func:`find_weights`, else a seeded
            random-weight model of the official architecture (a loud warning, and ``random_weights`` is True; so too
            for an engine whose sidecar says it was exported from random weights).
        backend: ``"auto"`` (the first usable row of :data:`vqfr.backends.BACKENDS` that loads this engine) or a
            backend name: ``tensorrt``, ``onnxruntime``, ``aoti``, ``torch``.
        device: ``"auto"``, ``"cuda"``, ``"cuda:N"`` or ``"cpu"``.
        precision: ``"auto"`` (fp32 for checkpoints, the engine's own precision for engines), ``"fp32"``,
            ``"fp16"`` or ``"bf16"`` (torch on CUDA; the precision an engine was built with).
        fidelity: v2 fidelity ratio in [0, 1] used when a call does not give one (0: best quality, the demo
            default; 1: best fidelity). v1 has none and ignores it.
        config: model options for checkpoints, as ``vqfr.load_model`` takes them (``"v1"``, ``"v2"``, a dict or the
            path of a yml or JSON file); with ``engine=None`` it picks the version (default v2).
        face_size: aligned face side for v1 checkpoints and v1 engines with dynamic H and W (default 512, the
            released model); v2 and other engines fix it.
        max_batch: most faces per inference call.
        detector: face detector: None/"mtcnn" (embedded), "retinaface:PATH", a weights path, or an object with
            ``detect(img)`` (see :mod:`vqfr.faces.detector`).
        detector_max_pixels: the most pixels of a photo the detector's network sees; a larger photo is searched on
            an area-downscaled copy (bounds the detector's memory; faces that become too small there are missed).
            None: the detector's own limit (RetinaFace 16 MP; MTCNN 4 MP for its largest pyramid level). For a
            detector object, set it on the object (``RetinaFace(path, max_pixels=N)``).
        parser: optional face-parsing network (path or object) for the paste-back mask; None: feathered square.
        upsampler: background upsampler ``(img, scale) -> img``; None: Lanczos.
        aligned: default of :meth:`restore`'s ``aligned`` when a call passes None.
        max_pixels: larger input images are refused (InputError).
        eye_dist_threshold: faces whose eyes are closer than this many pixels are skipped (official: 5).

    A runtime may be shared between threads: its inference calls run one batch at a time (a TensorRT execution
    context, CUDA graphs and the backends' buffers serve one caller at a time), and :meth:`close` waits for the batch
    in flight; the next call loads the engine again.
    """

    def __init__(self, engine: str | Path | nn.Module | None = None, *, backend: str = "auto", device: str = "auto",
                 precision: str = "auto", fidelity: float = 0.0, config: Any = None, face_size: int | None = None,
                 max_batch: int = 4, detector: Any = None, parser: Any = None, upsampler: Upsampler | None = None,
                 aligned: bool = False, max_pixels: int = MAX_PIXELS, eye_dist_threshold: float = 5.0,
                 detector_max_pixels: int | None = None):
        from vqfr.faces.detector import check_max_pixels

        self.fidelity = _check_fidelity(fidelity)
        self.detector_max_pixels = check_max_pixels(detector_max_pixels, detector, name="detector_max_pixels")
        if max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch, self.aligned, self.max_pixels = int(max_batch), aligned, max_pixels
        self.eye_dist_threshold = eye_dist_threshold
        self.random_weights = False
        # Held while the backend loads, runs a batch or closes: threads sharing the runtime take turns.
        self._lock = threading.RLock()
        source, meta = self._resolve_engine(engine, config, backend, device)
        self.engine = source
        self.backend: Backend = self._load_backend(source, meta, backend, device, precision, config)
        self.arch: str = self.backend.arch or ""
        try:
            if self.arch not in _RESTORERS:
                raise ConfigError(f"the engine is a {self.arch or 'model of unknown type'}, not a VQFR restoration "
                                  "model", path=None if isinstance(source, nn.Module) else source,
                                  fix="pass a VQFR v1 or v2 checkpoint or engine (VQGAN models do not restore)")
            self.face_size = self._face_size(face_size)
        except ConfigError:
            self.backend.close()
            raise
        self._detector_spec, self._parser_spec = detector, parser
        self._detector = self._parser = None
        self.upsampler: Upsampler = upsampler or upscale_lanczos

    # ------------------------------------------------------------------ engine and backend
    def _resolve_engine(self, engine: Any, config: Any, backend: str, device: str) -> tuple[Any, EngineMeta | None]:
        if isinstance(engine, nn.Module):
            return engine, None
        if engine is None:
            from vqfr.models import resolve_options

            options = resolve_options(config if config is not None else "v2")
            found = find_weights(options["type"])
            if found is not None:
                return found, None
            self._warn_random_weights(options["type"])
            return _random_model(options), None
        path = Path(engine).expanduser()
        kind = path.suffix.lower()
        if not path.is_file():
            error = EngineError if kind in _ENGINE_SUFFIXES else CheckpointError
            raise error("is not a file" if path.exists() else "does not exist", path=path,
                        fix="check the path of the engine or weights file")
        candidates(kind, backend, device, path=path)  # a backend that cannot load the file: said before it is read
        if kind in _ENGINE_SUFFIXES:
            meta = read_sidecar(path)
            if meta.arch not in _RESTORERS:
                raise EngineError(f"sidecar says arch {meta.arch!r}, not a VQFR restoration model", path=path,
                                  fix="export a VQFRv1 or VQFRv2 model")
            verify_engine_file(path, meta)
            if meta.from_random_weights:
                self._warn_random_weights(meta.arch, path)
            return path, meta
        return path, None

    def _warn_random_weights(self, arch: str, engine: Path | None = None) -> None:
        """Set ``random_weights`` and print the banner (see :func:`_banner`)."""
        self.random_weights = True
        sys.stderr.write(_banner(arch, engine))
        sys.stderr.flush()

    def _load_backend(self, source: Any, meta: EngineMeta | None, backend: str, device: str, precision: str,
                      config: Any) -> Backend:
        kind = engine_kind(source)
        tried, mismatches = [], []
        for entry in candidates(kind, backend, device, path=None if isinstance(source, nn.Module) else source):
            cls = entry.backend_class()
            reason, _ = cls.check(entry, meta)
            mismatch = None if reason else cls.engine_problem(entry, meta)
            if reason or mismatch:
                tried.append(f"{entry.label}: {reason or mismatch}")
                if mismatch:
                    mismatches.append(f"{entry.label}: {mismatch}")
                continue
            be = cls(entry, source, meta=meta, precision=precision, options=config,
                     device=device if device.startswith("cuda:") else None)
            try:
                be.load()
            except BackendUnavailable as exc:
                tried.append(f"{entry.label}: {exc}")
                continue
            return be
        if mismatches:
            raise EngineError("was built for other software or hardware than this machine's: "
                              + "; ".join(mismatches), path=source,
                              fix="rebuild the engine on this machine (python -m export.trt / export.aoti), "
                                  "or run its .onnx or the .pth weights instead")
        where = "" if isinstance(source, nn.Module) else f" for {source}"
        raise BackendUnavailable(f"no usable backend{where} (backend={backend}, device={device}): " + "; ".join(tried),
                                 fix="see vqfr.Runtime.available() (CLI: --list-backends), install the missing extra, "
                                     "or choose another --backend/--device")

    def _face_size(self, requested: int | None) -> int:
        fixed = self.backend.face_size
        if fixed is not None:
            if requested is not None and requested != fixed:
                raise ConfigError(f"face_size {requested} asked, but this {self.arch} engine works at {fixed}",
                                  path=None if isinstance(self.engine, nn.Module) else self.engine,
                                  fix="leave face_size unset (CLI: drop --face-size)")
            return int(fixed)
        size = 512 if requested is None else int(requested)
        if size <= 0 or size % 32:
            raise ConfigError(f"face_size must be a positive multiple of 32, got {size}")
        return size

    @staticmethod
    def available(engine: str | Path | nn.Module | None = None, backend: str = "auto",
                  device: str = "auto") -> list[Availability]:
        """Every backend (or those that load ``engine``) with whether it is usable here and why not.

        An engine file's sidecar is read, so an engine built for another GPU or TensorRT version shows as unusable
        with the reason. ``print(*Runtime.available(), sep="\\n")`` gives a table.
        """
        meta = None
        if engine is not None and not isinstance(engine, nn.Module):
            # a backend or device that cannot load the file is the error, whatever its sidecar (as in __init__)
            candidates(engine_kind(engine), backend, device, path=engine)
            if Path(engine).suffix.lower() in _ENGINE_SUFFIXES:
                meta = read_sidecar(engine)
        return availability(engine, meta, backend, device)

    @property
    def entry(self) -> BackendEntry:
        return self.backend.entry

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def precision(self) -> str:
        return self.backend.precision

    @property
    def version(self) -> int:
        return 1 if self.arch == "VQFRv1" else 2

    def __repr__(self) -> str:
        if isinstance(self.engine, nn.Module):
            src = "random weights" if self.random_weights else "in-memory module"
        else:
            src = f"{self.engine} (random weights)" if self.random_weights else str(self.engine)
        return (f"Runtime({src}: {self.arch} at {self.face_size}px on {self.entry.label} {self.device}, "
                f"{self.precision})")

    def close(self) -> None:
        """Release the engine (the next restore or ``with`` loads it again); waits for a batch in flight."""
        with self._lock:
            self.backend.close()

    def _ensure_loaded(self) -> None:
        # closed by close() or the end of an earlier `with`; a runner swapped in (deploy.bench) manages itself
        if not getattr(self.backend, "loaded", True):
            self.backend.load()

    def __enter__(self) -> Runtime:
        with self._lock:
            self._ensure_loaded()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ faces
    @property
    def detector(self):
        """The face detector (built on first use)."""
        if self._detector is None:
            from vqfr.faces.detector import load_detector

            self._detector = load_detector(self._detector_spec, device=str(self.device) if self.device.type == "cuda"
                                           else "cpu", max_pixels=self.detector_max_pixels)
        return self._detector

    @property
    def parser(self):
        """The face-parsing network, or None (feathered masks)."""
        if self._parser is None and self._parser_spec is not None:
            from vqfr.faces.parsing import load_parser

            self._parser = load_parser(self._parser_spec, device=str(self.device))
        return self._parser

    # ------------------------------------------------------------------ inference
    def infer(self, x: Tensor | np.ndarray, fidelity: float | Tensor | np.ndarray | None = None) -> Tensor:
        """Run the model on aligned faces, in batches of at most ``max_batch``.

        Args:
            x: [B, 3, S, S] float32 RGB in [-1, 1] (S = ``face_size``), a tensor or an array.
            fidelity: a float, or [B] per face; None: the runtime's default.

        Returns:
            [B, 3, S, S] float32 on the CPU, unclamped (``vqfr.imaging.to_images`` makes images of it).
        """
        return self._infer(x, fidelity, on_host=True)

    def _infer(self, x: Tensor | np.ndarray, fidelity: float | Tensor | np.ndarray | None, on_host: bool) -> Tensor:
        """:meth:`infer`; with ``on_host=False`` the outputs stay where the backend produced them (the GPU for GPU
        backends), for callers that convert them there."""
        x = _as_float_batch(x)
        if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (self.face_size, self.face_size):
            raise InputError(f"infer takes [B, 3, {self.face_size}, {self.face_size}], got {tuple(x.shape)}",
                             fix="align faces to the model's face size first")
        if not torch.isfinite(x).all():
            raise InputError("infer input contains NaN or inf", fix="pass finite values in [-1, 1]")
        f = self.fidelity if fidelity is None else fidelity
        try:
            fid = (f.detach().float().cpu() if isinstance(f, Tensor) else torch.from_numpy(np.asarray(f, np.float32))
                   ).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"fidelity must be a number or one number per face in [0, 1], got {f!r}") from exc
        if fid.numel() == 1:
            fid = fid.expand(x.shape[0]).contiguous()
        if fid.shape[0] != x.shape[0]:
            raise InputError(f"{fid.shape[0]} fidelity values for {x.shape[0]} faces")
        for v in fid.tolist():
            _check_fidelity(v)
        outs = []
        for i in range(0, x.shape[0], self.batch_size):
            with self._lock:  # another thread may have closed the engine, or be running a batch
                self._ensure_loaded()
                out = self.backend.infer(x[i:i + self.batch_size], fid[i:i + self.batch_size]).float()
            if not torch.isfinite(out).all():
                where = "in-memory model" if isinstance(self.engine, nn.Module) else str(self.engine)
                raise EngineError(f"the model returned NaN or inf for faces {i}..{i + out.shape[0] - 1} of the batch",
                                  path=None if isinstance(self.engine, nn.Module) else self.engine,
                                  fix=f"run {where} in fp32 (precision='fp32'); if it persists, the weights are broken")
            outs.append(out.cpu() if on_host else out)  # a long batch never piles up on the GPU
        return torch.cat(outs) if outs else x.new_zeros(x.shape)

    @property
    def batch_size(self) -> int:
        """Faces per inference call: ``max_batch``, or less when the engine was built for fewer."""
        return min(self.max_batch, self.backend.max_batch or self.max_batch)

    def _restore_crops(self, crops: np.ndarray, fidelity: float | None) -> np.ndarray:
        """[N, S, S, 3] uint8 crops -> restored crops, converted batch by batch (a photo with hundreds of faces
        never holds them all as float tensors)."""
        out = np.empty_like(crops)
        for i in range(0, len(crops), self.batch_size):
            x = to_tensor(crops[i:i + self.batch_size], device=self.backend.device)  # uint8 crosses, not float32
            out[i:i + self.batch_size] = to_images(self._infer(x, fidelity, on_host=False))
        return out

    # ------------------------------------------------------------------ public restore API
    def restore(self, img: str | Path | np.ndarray, *, aligned: bool | None = None, fidelity: float | None = None,
                upscale: float = 1, only_center_face: bool = False) -> np.ndarray:
        """Restore one image.

        Args:
            img: a path, or an OpenCV BGR uint8 [H, W, 3] array (grey, BGRA and 16-bit are converted).
            aligned: True: ``img`` is one FFHQ-aligned square face; it is resized to the face size if needed
                (bilinear, as the official demo) and the model's restored face is returned. False: detect, align,
                restore and paste back every face. None: the runtime's default (False unless set).
            fidelity: v2 fidelity in [0, 1]; None: the runtime's default.
            upscale: output scale of the photo (ignored for aligned inputs).
            only_center_face: restore only the face nearest the image centre.

        Returns:
            [H*upscale, W*upscale, 3] uint8 BGR (aligned: [S, S, 3]). A photo without faces comes back upscaled.
        """
        return self.restore_faces(img, aligned=aligned, fidelity=fidelity, upscale=upscale,
                                  only_center_face=only_center_face).image

    def restore_faces(self, img: str | Path | np.ndarray, *, aligned: bool | None = None,
                      fidelity: float | None = None, upscale: float = 1,
                      only_center_face: bool = False) -> Restoration:
        """Like :meth:`restore`, but returns every face's box, landmarks, affine, aligned crop and restored crop
        together with the restored image."""
        return self.restore_faces_batch([img], aligned=aligned, fidelity=fidelity, upscale=upscale,
                                        only_center_face=only_center_face)[0]

    def restore_batch(self, images: Iterable[str | Path | np.ndarray], *, aligned: bool | None = None,
                      fidelity: float | None = None, upscale: float = 1,
                      only_center_face: bool = False) -> list[np.ndarray]:
        """Restore several images (a list, any iterable such as ``folder.glob("*.png")``, or an array of images
        [N, H, W] or [N, H, W, C]), batching their faces together. Returns one image per input."""
        return [r.image for r in self.restore_faces_batch(images, aligned=aligned, fidelity=fidelity,
                                                          upscale=upscale, only_center_face=only_center_face)]

    def restore_faces_batch(self, images: Iterable[str | Path | np.ndarray], *, aligned: bool | None = None,
                            fidelity: float | None = None, upscale: float = 1,
                            only_center_face: bool = False) -> list[Restoration]:
        """:meth:`restore_faces` for several images; all their faces go through the model in shared batches."""
        if isinstance(images, (str, Path)):  # iterating it would read its characters as files
            raise InputError("restore_batch takes several images, got one path", path=images,
                             fix="pass a list of paths (restore_batch([path])), or call restore(path)")
        if isinstance(images, np.ndarray) and (images.ndim < 3 or (images.ndim == 3 and images.shape[-1] in (3, 4))):
            # iterating it would take each row of pixels for an image; [N, H, W] (grey) and [N, H, W, C] are batches
            raise InputError(f"restore_batch takes several images, got one image array of shape {images.shape}",
                             fix="pass a list of images (restore_batch([img])), or call restore(img)")
        images = list(images)  # an iterator (Path.glob) is read twice below
        aligned = self.aligned if aligned is None else aligned
        if fidelity is not None:
            _check_fidelity(fidelity)
        if not (upscale > 0 and np.isfinite(upscale)):
            raise ConfigError(f"upscale must be a positive, finite number, got {upscale}")
        photos = [self.read(img) for img in images]
        if not photos:
            return []
        if aligned:
            crops = np.zeros((len(photos), self.face_size, self.face_size, 3), np.uint8)
            for i, (photo, source) in enumerate(zip(photos, images, strict=True)):
                crops[i] = self._aligned_crop(photo, source)
            restored = self._restore_crops(crops, fidelity)
            return [Restoration(r, [self._aligned_face(p, c, r)])
                    for p, c, r in zip(photos, crops, restored, strict=True)]
        from vqfr.faces.align import align_faces

        found, all_crops = [], []
        for photo, source in zip(photos, images, strict=True):
            self._check_output_size(photo, upscale, source)
            dets = self._detect(photo, only_center_face)
            crops, affines = align_faces(photo, [d.landmarks for d in dets], self.face_size)
            found.append((dets, crops, affines))
            all_crops.append(crops)
        restored = self._restore_crops(np.concatenate(all_crops), fidelity)
        results, start = [], 0
        for photo, (dets, crops, affines) in zip(photos, found, strict=True):
            mine = restored[start:start + len(dets)]
            start += len(dets)
            faces = [RestoredFace(d.box, d.score, d.landmarks, a, c, r)
                     for d, a, c, r in zip(dets, affines, crops, mine, strict=True)]
            results.append(Restoration(self._paste(photo, mine, affines, upscale), faces))
        return results

    # ------------------------------------------------------------------ steps
    def read(self, img: str | Path | np.ndarray) -> np.ndarray:
        """A path (``~`` expanded, as for the engine) or array -> BGR uint8 [H, W, 3] (a new array; the input is never
        modified)."""
        if isinstance(img, (str, Path)):
            return load_image(Path(img).expanduser(), self.max_pixels)
        arr = as_bgr_uint8(img)
        if arr.shape[0] * arr.shape[1] > self.max_pixels:
            raise InputError(f"image is {arr.shape[1]}x{arr.shape[0]} pixels, over the limit of {self.max_pixels}",
                             fix="downscale it first or raise max_pixels")
        return arr

    def _check_output_size(self, photo: np.ndarray, upscale: float, source: Any) -> None:
        """Refuse a photo whose upscaled result would pass ``max_pixels`` (before any memory is spent on it)."""
        width, height = max(int(photo.shape[1] * upscale), 1), max(int(photo.shape[0] * upscale), 1)
        if width * height > self.max_pixels:
            raise InputError(f"upscaled {upscale:g}x it would be {width}x{height} = {width * height:,} pixels, over "
                             f"the limit of {self.max_pixels:,}",
                             path=source if isinstance(source, (str, Path)) else None,
                             fix="lower the upscale (-s), or raise the limit (max_pixels=, CLI --max-pixels)")

    def _aligned_crop(self, photo: np.ndarray, source: Any) -> np.ndarray:
        import cv2

        h, w = photo.shape[:2]
        if h != w:
            raise InputError(f"is {w}x{h}, not square: an aligned input must be a square FFHQ-aligned face",
                             path=source if isinstance(source, (str, Path)) else None,
                             fix="drop aligned=True (--aligned) to detect and align the faces, or crop it square")
        if h == self.face_size:
            return photo
        return cv2.resize(photo, (self.face_size, self.face_size), interpolation=cv2.INTER_LINEAR)

    def _aligned_face(self, photo: np.ndarray, crop: np.ndarray, restored: np.ndarray) -> RestoredFace:
        from vqfr.faces.align import template

        side = photo.shape[0]
        scale = self.face_size / side
        shift = (scale - 1) / 2  # cv2.resize aligns pixel centres: x_crop = scale * x + (scale - 1) / 2
        landmarks = ((template(self.face_size) - shift) / scale).astype(np.float32)  # the template, in input pixels
        return RestoredFace(np.array([0, 0, side, side], np.float32), 1.0, landmarks,
                            np.array([[scale, 0, shift], [0, scale, shift]], np.float64), crop, restored)

    def _detect(self, photo: np.ndarray, only_center_face: bool) -> list:
        dets = [d for d in self.detector.detect(photo) if d.eye_distance >= self.eye_dist_threshold]
        if only_center_face and len(dets) > 1:
            centre = np.array([photo.shape[1], photo.shape[0]], np.float32) / 2
            dets = [min(dets, key=lambda d: float(np.linalg.norm((d.box[:2] + d.box[2:]) / 2 - centre)))]
        return dets

    def _paste(self, photo: np.ndarray, restored: np.ndarray, affines: np.ndarray, upscale: float) -> np.ndarray:
        import cv2

        from vqfr.faces.paste import paste_faces

        background = self.upsampler(photo, upscale)
        size = (max(int(photo.shape[1] * upscale), 1), max(int(photo.shape[0] * upscale), 1))
        if background.shape[:2] != size[::-1]:
            background = cv2.resize(background, size, interpolation=cv2.INTER_LANCZOS4)
        if not len(restored):
            return background
        regions = self.parser.regions(restored) if self.parser is not None else None
        # the photo's size makes the paste's scale exact (the background's alone cannot when it was downscaled)
        return paste_faces(background, restored, affines, upscale, regions,
                           photo_size=(photo.shape[1], photo.shape[0]))


def _as_float_batch(x: Any) -> Tensor:
    """A float tensor or array -> a float tensor (arrays become float32); anything else -> InputError."""
    if isinstance(x, Tensor):
        if not x.is_floating_point():
            raise InputError(f"infer takes a float tensor in [-1, 1], got {x.dtype}",
                             fix="convert images with vqfr.imaging.to_tensor")
        return x
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        what = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise InputError(f"infer takes a float array or tensor in [-1, 1], got {what}",
                         fix="convert images with vqfr.imaging.to_tensor")
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _check_fidelity(value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"fidelity must be a number in [0, 1], got {value!r}") from exc
    if not 0.0 <= v <= 1.0:
        raise ConfigError(f"fidelity must be in [0, 1], got {v}", fix="0 = best quality, 1 = best fidelity")
    return v


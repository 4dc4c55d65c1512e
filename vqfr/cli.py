"""``python -m vqfr`` / ``vqfr``: restore the faces in a photo, a folder or a glob, like the official demo.

Outputs (each name contains its input's stem), written atomically::

    OUTPUT/restored_imgs/{stem}[_{suffix}].{ext}     the restored photo (not for --aligned inputs)
    OUTPUT/restored_faces/{stem}_{i:02d}[_{suffix}].png
    OUTPUT/cropped_faces/{stem}_{i:02d}.png          the aligned crop fed to the model
    OUTPUT/cmp/{stem}_{i:02d}.png                    crop | restored, side by side

A bad input gets one line on stderr and the run goes on. Inputs are only read; an output that would replace an input
of the run is refused. The outputs of one input are written together: an interrupt (Ctrl-C, SIGTERM) waits until they
are all in place, so an interrupted run holds only complete outputs and ``--skip-existing`` resumes it; a write that
fails meanwhile still gets its FAILED line. A signal the process was started with ignored (SIGINT under ``&`` in a
script) stays ignored.

Exit codes: 0 all inputs restored; 1 setup error (engine, weights, options, output folder; or the output folder
became unwritable mid-run, e.g. disk full); 2 usage error; 3 some inputs failed (the others were written);
130 interrupted (SIGINT), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import glob
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

from vqfr.backends.base import BACKEND_NAMES
from vqfr.errors import ConfigError, InputError, OutputError, VQFRError
from vqfr.imaging import IMAGE_SUFFIXES, MAX_PIXELS

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_SOME_FAILED", "EXIT_INTERRUPTED",
           "EXIT_TERMINATED"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_SOME_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143

#: Write errors that hit every later output too: the run stops (exit 1) instead of failing each input in turn.
_FOLDER_ERRNOS = {errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}

#: Where the sample faces live when the package is run from a checkout next to ../shared.
SAMPLE_FACES = Path(__file__).resolve().parents[2] / "shared" / "faces"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vqfr", description="VQFR blind face restoration: detect, align, restore and paste back every face.",
        epilog="Exit codes: 0 ok, 1 setup error, 2 usage error, 3 some inputs failed, 130 interrupted, "
               "143 terminated.")
    io = p.add_argument_group("input and output")
    io.add_argument("-i", "--input", help="image file, folder or glob (default: the embedded demo photo; with "
                                          "--aligned, ../shared/faces/aligned when present)")
    io.add_argument("-o", "--output", default="results", help="output folder (default: results)")
    io.add_argument("--ext", choices=("auto", "jpg", "png"), default="auto",
                    help="restored image format; auto = the input's (default: auto)")
    io.add_argument("--suffix", help="suffix added to the restored image and face names")
    io.add_argument("--skip-existing", action="store_true", help="skip inputs whose outputs already exist (resume)")
    io.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="refuse larger images (default: %(default)s)")
    model = p.add_argument_group("model")
    model.add_argument("-v", "--version", choices=("1", "2", "1.0", "2.0"),
                       help="VQFR version for --weights or the default weights (default: 2, or the engine's)")
    src = model.add_mutually_exclusive_group()
    src.add_argument("--weights", help="checkpoint: VQFR_v2.pth, VQFR_v1-33a1fac5.pth or .safetensors "
                                       "(default: $VQFR_WEIGHTS, ./experiments/pretrained_models, ./weights, "
                                       "~/.cache/vqfr; else RANDOM weights, with a warning)")
    src.add_argument("--engine", help="exported engine: .onnx, .engine/.plan (TensorRT) or .pt2 (AOTInductor)")
    model.add_argument("--config", help="model options for --weights: a yml or JSON with a network_sr, network_g "
                                        "or network_options block, or the bare options")
    model.add_argument("-f", "--fidelity", type=float, default=0.0,
                       help="v2 fidelity in [0, 1]: 0 best quality, 1 best fidelity (default: 0)")
    model.add_argument("--face-size", type=int, help="aligned face size for v1 checkpoints and v1 .onnx/.pt2 "
                                                     "exported with --dynamic-size (default: 512)")
    faces = p.add_argument_group("faces")
    faces.add_argument("-s", "--upscale", type=float, default=2, help="output scale of the photo (default: 2)")
    faces.add_argument("--aligned", action="store_true", help="inputs are FFHQ-aligned square faces")
    faces.add_argument("--only_center_face", "--only-center-face", action="store_true",
                       help="restore only the face nearest the centre")
    faces.add_argument("--detector", help="face detector: mtcnn (default, embedded) or retinaface:PATH "
                                          "(facexlib's detection_Resnet50_Final.pth)")
    faces.add_argument("--detector-max-pixels", type=int, default=None, metavar="N",
                       help="most pixels of a photo the face detector sees; a larger photo is searched on a downscaled "
                            "copy (default: the detector's own: RetinaFace 16 MP, MTCNN 4 MP)")
    faces.add_argument("--parser", help="face-parsing network (.onnx or TorchScript) for the paste mask "
                                        "(default: a feathered square)")
    run = p.add_argument_group("execution")
    run.add_argument("--backend", choices=BACKEND_NAMES, default="auto", help="default: auto (fastest usable)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    run.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                     help="auto: fp32 for weights (exact), an exported engine's own precision (default: auto)")
    run.add_argument("--batch", type=int, default=4, help="most faces per inference call (default: 4)")
    run.add_argument("--io-threads", type=int, default=min(8, os.cpu_count() or 1),
                     help="threads that read and write images while the model runs (default: CPU count, at most 8)")
    run.add_argument("--list-backends", action="store_true", help="print which backends can run here, and exit")
    run.add_argument("--debug", action="store_true", help="print tracebacks for failures")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def _collect_inputs(spec: str) -> tuple[list[Path], int]:
    """(image files, number of non-image files skipped in a folder or among a glob's matches).

    Raises:
        InputError: ``spec`` cannot be looked at (a name too long, a folder that may not be entered or listed).
    """
    path = Path(spec).expanduser()
    try:
        if path.is_file():
            return [path], 0
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
            images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
            return images, len(files) - len(images)
    except OSError as exc:
        raise InputError(f"cannot be read ({exc.strerror})", path=path, fix="check the path (-i) and its permissions"
                         ) from exc
    pattern = os.path.expanduser(spec)  # a quoted '~/photos/*.jpg' reaches us unexpanded
    matched = sorted(Path(f) for f in glob.glob(pattern, recursive=True) if Path(f).is_file())
    images = [f for f in matched if f.suffix.lower() in IMAGE_SUFFIXES]  # 'photos/*' as the folder photos/
    return images, len(matched) - len(images)


def _output_stems(files: list[Path]) -> dict[Path, str]:
    """Input -> output stem, unique without regard to case so no output overwrites another: inputs sharing a stem
    (a.jpg, a.png) get their extension appended (a_jpg, a_png), and any clash left (x.png in two folders) a number."""
    counts: dict[str, int] = {}
    for f in files:
        counts[f.stem.casefold()] = counts.get(f.stem.casefold(), 0) + 1
    taken: set[str] = set()
    stems = {}
    for f in files:
        stem = f.stem if counts[f.stem.casefold()] == 1 else f"{f.stem}_{f.suffix.lstrip('.').lower()}"
        candidate, n = stem, 1
        while candidate.casefold() in taken:
            n += 1
            candidate = f"{stem}_{n}"
        taken.add(candidate.casefold())
        stems[f] = candidate
    return stems


class _Signals:
    """SIGINT and SIGTERM become KeyboardInterrupt, except inside :meth:`protect`, where they wait until its end
    (so a chunk's outputs are written and reported all together, and no wait on a thread is cut short).

    Only the first signal is raised; later ones (a second Ctrl-C) wait like it, so an interrupt is never raised
    inside the clean-up of the first. After :meth:`hold` (the run is reporting) signals are ignored. Code that waits
    on threads (futures, executors) runs protected: an interrupt raised inside ``threading``'s own clean-up (a
    ``Condition`` re-acquiring its lock) breaks the lock (``RuntimeError: release unlocked lock``)."""

    def __init__(self):
        self.received: int | None = None
        self._raised = False
        self._held = False
        self._depth = 0
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        """Take over SIGINT and SIGTERM, except one the process was started with ignored (SIGINT for a command run
        with ``&`` by a non-interactive shell, such as a script): that one stays ignored, as the shell asked."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def hold(self) -> None:
        """From now on signals are ignored: every input is settled and the run only reports."""
        self._held = True

    def _handle(self, signum, frame) -> None:
        if self._held or self.received is not None:
            return  # reporting already, or already stopping: a second signal waits like the first
        self.received = signum
        if not self._depth:
            self._raised = True
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def protect(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth and self.received is not None and not self._raised and not self._held:
                self._raised = True
                raise KeyboardInterrupt


@contextlib.contextmanager
def _quiet_native_stderr(active: bool) -> Iterator[None]:
    """Send what native code prints to stderr to /dev/null: a failing file gets one line from us, not decoder
    chatter. ``load_image`` silences OpenCV's own log wherever it runs; this also covers what libpng and libjpeg
    print themselves (``libpng error: IDAT: CRC error``). Python's own sys.stderr is untouched."""
    if not active:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class _Job:
    """Writes the outputs of one run and counts what happened."""

    def __init__(self, args: argparse.Namespace, out: Path, inputs: list[Path], signals: _Signals):
        self.args, self.out, self.signals = args, out, signals
        self.images = self.faces = self.failed = self.skipped = self.faceless = 0
        self.infer_s = 0.0
        self.new_folders: list[Path] = []  # created by make_folders, outermost last
        # (device, inode) of every input: no output may replace one, whatever path (link, ../) leads to it.
        self.inputs = {}
        for f in inputs:
            with contextlib.suppress(OSError):
                st = f.stat()
                self.inputs[(st.st_dev, st.st_ino)] = f

    def make_folders(self) -> None:
        """Create the output folders and check that they take files: before the model loads, which takes a while.
        :meth:`remove_new_folders` takes them away again when the run cannot start."""
        groups = ("restored_faces", "cropped_faces", "cmp") + (() if self.args.aligned else ("restored_imgs",))
        for group in groups:
            folder = self.out / group
            self.new_folders += [p for p in (folder, *folder.parents) if not p.exists() and p not in self.new_folders]
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot create the output folder ({exc.strerror})", path=folder,
                                  fix="choose an output folder (-o) you can write to") from exc
            try:
                with tempfile.TemporaryFile(dir=folder):
                    pass
            except OSError as exc:
                raise OutputError(f"cannot write into the output folder ({exc.strerror})", path=folder,
                                  fix="choose an output folder (-o) you can write to, or fix its permissions") from exc

    def remove_new_folders(self) -> None:
        """Remove the folders :meth:`make_folders` created that are still empty (a run that could not start leaves
        nothing behind; a folder holding anything stays)."""
        for folder in sorted(self.new_folders, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty (another process wrote there), or gone
                folder.rmdir()

    def names(self, src: Path, stem: str, n_faces: int) -> dict[str, list[Path]]:
        sfx = f"_{self.args.suffix}" if self.args.suffix else ""
        ext = self.args.ext if self.args.ext != "auto" else src.suffix.lstrip(".").lower()
        if f".{ext}" not in IMAGE_SUFFIXES:
            ext = "png"
        return {
            "restored_imgs": [] if self.args.aligned else [self.out / "restored_imgs" / f"{stem}{sfx}.{ext}"],
            "restored_faces": [self.out / "restored_faces" / f"{stem}_{i:02d}{sfx}.png" for i in range(n_faces)],
            "cropped_faces": [self.out / "cropped_faces" / f"{stem}_{i:02d}.png" for i in range(n_faces)],
            "cmp": [self.out / "cmp" / f"{stem}_{i:02d}.png" for i in range(n_faces)],
        }

    def done_before(self, src: Path, stem: str) -> bool:
        """The input's last-written output exists (see :meth:`write`), so all of them do."""
        first = self.names(src, stem, 1)
        marker = first["restored_faces"][0] if self.args.aligned else first["restored_imgs"][0]
        try:
            return marker.is_file()
        except OSError:  # e.g. a name too long for the file system: not written, write() reports why
            return False

    def _refuse_overwriting_inputs(self, src: Path, paths: list[Path]) -> None:
        for path in paths:
            try:
                st = path.stat()
            except OSError as exc:
                if exc.errno == errno.ENAMETOOLONG:  # refused before any output of this input is written
                    raise OutputError(f"the output name is too long for the file system "
                                      f"({len(os.fsencode(path.name))} bytes)", path=path,
                                      fix="shorten the input's file name (or --suffix)") from exc
                continue
            other = self.inputs.get((st.st_dev, st.st_ino))
            if other is not None:
                what = "its own input" if other == src else f"another input of this run, {other}"
                raise OutputError(f"an output would overwrite {what}", path=path,
                                  fix="choose an output folder (-o) apart from the inputs")

    def write(self, src: Path, stem: str, result) -> None:
        """Write every output of one input, the marker of :meth:`done_before` last. Everything is encoded first, so
        an output that cannot be encoded fails the input with no file written. Runs on a writer thread
        (:class:`_Pipeline`), where no signal can cut it short."""
        from vqfr.atomic import atomic_write_bytes
        from vqfr.imaging import encode_image

        names = self.names(src, stem, len(result.faces))
        self._refuse_overwriting_inputs(src, [p for group in names.values() for p in group])
        images: list[tuple[Path, np.ndarray]] = []
        for face, rest, crop, cmp in zip(result.faces, names["restored_faces"], names["cropped_faces"],
                                         names["cmp"], strict=True):
            images += [(crop, face.cropped), (cmp, np.concatenate([face.cropped, face.restored], axis=1)),
                       (rest, face.restored)]
        images += [(path, result.image) for path in names["restored_imgs"]]
        encoded = [(path, encode_image(path, img)) for path, img in images]
        for path, data in encoded:
            atomic_write_bytes(path, data)


def _fail(job: _Job, src: Path, exc: BaseException, bar) -> None:
    """One line on stderr for a failed input (and the traceback with --debug)."""
    job.failed += 1
    if isinstance(exc, VQFRError):
        # an error naming another file (the engine whose output was NaN, an output that could not be written) still
        # gets the input it cost first: the line must say which photo failed
        text = str(exc) if exc.path == src else f"{src}: {exc}"
    elif isinstance(exc, MemoryError):
        text = f"{src}: out of memory. Fix: lower --batch or --max-pixels, or free memory"
    else:
        text = f"{src}: unexpected {type(exc).__name__}: {exc} (a bug: please report it with the --debug output)"
    bar.write(f"vqfr: FAILED {text}", file=sys.stderr)
    if job.args.debug:
        bar.write("".join(traceback.format_exception(exc)).rstrip(), file=sys.stderr)


class _Pipeline:
    """Runs the inputs chunk by chunk: a chunk's images are read on reader threads, the model runs on the main
    thread, and the chunk's outputs are encoded and written on writer threads while the model runs on the next chunk
    (PNG encoding takes several times longer than a GPU forward). At most one chunk is being written at a time.

    Everything that reports, counts or handles a signal happens on the main thread. A signal stops the run between
    inputs, never inside one: the chunk being written is finished (each input's outputs complete) and reported by
    :meth:`close`. Any Exception is caught per input: one bad file must not cost the others. An output folder that
    stops taking files (disk full, read-only) ends the run instead (:attr:`stopped`).
    """

    def __init__(self, rt, job: _Job, bar, threads: int):
        self.rt, self.job, self.bar = rt, job, bar
        self.readers = ThreadPoolExecutor(threads, thread_name_prefix="vqfr-read")
        self.writers = ThreadPoolExecutor(threads, thread_name_prefix="vqfr-write")
        self.writing: list[tuple[Path, Any, Future]] = []
        self.stopped: OutputError | None = None

    def run(self, chunks: Iterable[list[tuple[Path, str]]]) -> None:
        """Restore and write every chunk; raises the folder's OutputError when it stops taking files (and
        KeyboardInterrupt on a signal: at once while the model runs, else when the wait it came in is over). Call
        :meth:`close` afterwards in any case."""
        signals = self.job.signals
        for chunk in chunks:
            loaded = self._read(chunk)
            results = self._restore(loaded)
            self._settle()
            if self.stopped is not None:
                raise self.stopped
            with signals.protect():  # a write started is a write settled; a report is never cut in half
                for (src, stem, _), result in zip(loaded, results, strict=True):
                    if isinstance(result, Exception):
                        self._report(src, None, result)
                    else:
                        self.writing.append((src, result, self.writers.submit(self.job.write, src, stem, result)))
        self._settle()
        if self.stopped is not None:
            raise self.stopped

    def close(self) -> None:
        """Wait for the reads and the outputs being written, report the outputs and end the threads (a signal
        meanwhile waits too; :attr:`_Signals.received` tells whether one came). Safe to call again."""
        signals = self.job.signals
        try:
            with signals.protect():
                try:
                    with _quiet_native_stderr(not self.job.args.debug):  # reads still running may print
                        self.readers.shutdown(wait=True, cancel_futures=True)
                    self._settle()
                finally:
                    self.writers.shutdown(wait=True)
                    signals.hold()
        except KeyboardInterrupt:
            pass  # a signal during the wait: signals.received says so

    def _read(self, chunk: list[tuple[Path, str]]) -> list[tuple[Path, str, np.ndarray]]:
        """The chunk's images, read side by side; an unreadable one is reported and left out. A signal waits until
        the chunk is read (reads are bounded by --max-pixels), so no read outlives the run or prints after it."""
        with self.job.signals.protect():
            with _quiet_native_stderr(not self.job.args.debug):
                futures = [self.readers.submit(self.rt.read, src) for src, _ in chunk]
                wait(futures)
            loaded = []
            for (src, stem), future in zip(chunk, futures, strict=True):
                error = future.exception()
                if error is None:
                    loaded.append((src, stem, future.result()))
                else:
                    self._report(src, None, error)
        return loaded

    def _restore(self, loaded: list[tuple[Path, str, np.ndarray]]) -> list[Any]:
        """Each image's Restoration, or the Exception it raised (faces batched across the chunk)."""
        args = self.job.args
        kwargs = dict(aligned=args.aligned, fidelity=args.fidelity, upscale=args.upscale,
                      only_center_face=args.only_center_face)
        start = time.perf_counter()
        try:
            results: list[Any] = self.rt.restore_faces_batch([img for _, _, img in loaded], **kwargs)
        except Exception:  # noqa: BLE001 - one input spoiled the shared batch: redo them one by one, keep the others
            results = []
            for _, _, img in loaded:
                try:
                    results.append(self.rt.restore_faces(img, **kwargs))
                except Exception as exc:  # noqa: BLE001 - reported per input
                    results.append(exc)
        self.job.infer_s += time.perf_counter() - start
        return results

    def _settle(self) -> None:
        """Wait for the chunk being written and report each input, in order. A signal meanwhile waits until all of
        it is written and reported, so none is reported twice or lost."""
        with self.job.signals.protect():
            while self.writing:
                src, result, future = self.writing[0]
                wait([future])
                self.writing.pop(0)
                self._report(src, result, future.exception())

    def _report(self, src: Path, result, error: BaseException | None) -> None:
        job = self.job
        if error is None:
            job.images += 1
            job.faces += len(result.faces)
            if not result.faces:
                job.faceless += 1
                self.bar.write(f"vqfr: no face found in {src} (the photo was upscaled only)", file=sys.stderr)
        elif isinstance(error, OutputError) and error.errno in _FOLDER_ERRNOS:
            # the output folder stopped taking files: the run stops (exit 1), as it did for the first input of the
            # chunk that met it; the others of the chunk, written side by side, met the same full disk
            if self.stopped is None:
                self.stopped = error
        else:
            _fail(job, src, error, self.bar)
        self.bar.update(1)


def _default_input(aligned: bool) -> str | None:
    """The embedded demo photo; for --aligned, the sample aligned faces next to a checkout (None if absent)."""
    if not aligned:
        from vqfr.demo import demo_photo

        return str(demo_photo())
    folder = SAMPLE_FACES / "aligned"
    return str(folder) if folder.is_dir() else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.fidelity <= 1.0:
        parser.error(f"--fidelity must be in [0, 1], got {args.fidelity}")
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    if not (args.upscale > 0 and np.isfinite(args.upscale)):
        parser.error(f"--upscale must be a positive, finite number, got {args.upscale}")
    if args.io_threads < 1:
        parser.error(f"--io-threads must be at least 1, got {args.io_threads}")
    if args.max_pixels < 1:
        parser.error(f"--max-pixels must be positive, got {args.max_pixels}")
    if args.detector_max_pixels is not None and args.detector_max_pixels < 1:
        parser.error(f"--detector-max-pixels must be positive, got {args.detector_max_pixels}")
    if args.suffix is not None and (not args.suffix or set(args.suffix) & {"/", "\\", "\0"} or args.suffix == ".."):
        parser.error(f"--suffix must be a plain name part (no path separators), got {args.suffix!r}")

    signals = _Signals()
    signals.install()
    try:
        return _run(parser, args, signals)
    except KeyboardInterrupt:
        print("vqfr: interrupted before any input was restored", file=sys.stderr)
        return EXIT_TERMINATED if signals.received == signal.SIGTERM else EXIT_INTERRUPTED
    finally:
        signals.restore()


def _notes(job: _Job, args: argparse.Namespace, ignored: int) -> list[str]:
    """The summary line's counts beyond images, faces and failures."""
    notes = [f"{job.faceless} without faces"] if job.faceless and not args.aligned else []
    if job.skipped:
        notes.append(f"{job.skipped} skipped (existing)")
    if ignored:
        notes.append(f"{ignored} non-image files ignored")
    return notes


def _unused_with_aligned(args: argparse.Namespace) -> list[str]:
    """The options given that only act on whole photos (detection and pasting back)."""
    given = {"--detector": args.detector, "--detector-max-pixels": args.detector_max_pixels, "--parser": args.parser,
             "--only-center-face": args.only_center_face}
    return [name for name, value in given.items() if value]


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, signals: _Signals) -> int:
    from vqfr.models import resolve_options
    from vqfr.runtime import Runtime, find_weights

    engine = args.engine or args.weights
    if args.list_backends:
        try:
            print(*Runtime.available(engine, args.backend, args.device), sep="\n")
        except (VQFRError, ImportError) as exc:
            print(f"vqfr: error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        return EXIT_OK

    if args.input is None:
        args.input = _default_input(args.aligned)
        if args.input is None:
            parser.error("-i/--input is required (an image, a folder or a glob)")
        print(f"vqfr: no -i given; restoring {args.input}", file=sys.stderr)
    try:
        files, ignored = _collect_inputs(args.input)
    except InputError as exc:
        parser.error(str(exc))
    if not files:
        parser.error(f"no input images found at {args.input!r} (looked for {', '.join(IMAGE_SUFFIXES)})")

    version = args.version[0] if args.version else None
    out = Path(args.output).expanduser()  # the shell leaves the ~ of --output=~/restored to us
    job = _Job(args, out, files, signals)
    stems = _output_stems(files)
    todo = []
    for f in files:
        if args.skip_existing and job.done_before(f, stems[f]):
            job.skipped += 1
        else:
            todo.append((f, stems[f]))
    if not todo:  # a resumed run that is already complete: no model to load
        print(f"vqfr: 0 images, 0 faces restored, 0 failed, {', '.join(_notes(job, args, ignored))}; nothing left "
              f"to restore, so no model was loaded; outputs in {out}/")
        return EXIT_OK
    try:
        job.make_folders()
        # -v (or --config) picks the default weights; weights found ($VQFR_WEIGHTS, ./weights ...) then load exactly
        # as --weights: with their own options (safetensors metadata) unless --config is given, checked against -v.
        default = args.config or f"v{version or 2}"
        if engine is None:
            engine = find_weights(resolve_options(default)["type"])
        config = args.config if engine else default
        rt = Runtime(engine, backend=args.backend, device=args.device, precision=args.precision,
                     fidelity=args.fidelity, config=None if args.engine else config, face_size=args.face_size,
                     max_batch=args.batch, detector=args.detector, parser=args.parser, max_pixels=args.max_pixels,
                     detector_max_pixels=args.detector_max_pixels)
        if version and rt.version != int(version):
            rt.close()
            raise ConfigError(f"-v {version} was asked but {engine} is a VQFRv{rt.version} model",
                              fix=f"drop -v or pass -v {rt.version}")
        if args.fidelity and rt.version == 1:
            print("vqfr: note: VQFR v1 has no fidelity control; -f is ignored", file=sys.stderr)
        if not args.aligned:  # build the detector and parser now: a bad --detector/--parser fails before the loop
            rt.detector  # noqa: B018
            rt.parser  # noqa: B018
        elif unused := _unused_with_aligned(args):
            print(f"vqfr: note: {', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used with --aligned "
                  "(aligned faces are neither detected nor pasted back); ignored", file=sys.stderr)
    except (VQFRError, ImportError, OSError) as exc:
        job.remove_new_folders()
        print(f"vqfr: error: {exc}", file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return EXIT_ERROR
    print(f"vqfr: {rt}", file=sys.stderr)

    from tqdm import tqdm

    started = time.perf_counter()
    with rt, tqdm(total=len(todo), unit="img", disable=args.quiet or None, file=sys.stderr) as bar:
        pipeline = _Pipeline(rt, job, bar, args.io_threads)
        try:
            pipeline.run(todo[i:i + args.batch] for i in range(0, len(todo), args.batch))
        except (KeyboardInterrupt, OutputError):
            pass  # signals.received, pipeline.stopped
        finally:
            try:
                pipeline.close()
            except KeyboardInterrupt:  # the first signal, come just before close() took the signals over
                pipeline.close()
        stopped = pipeline.stopped
    interrupted = signals.received is not None
    wall = time.perf_counter() - started
    rate = job.faces / job.infer_s if job.infer_s > 0 else 0.0
    notes = _notes(job, args, ignored)
    print(f"vqfr: {job.images} images, {job.faces} faces restored, {job.failed} failed"
          f"{', ' + ', '.join(notes) if notes else ''} in {wall:.1f} s ({job.faces / max(wall, 1e-9):.2f} faces/s; "
          f"the model alone {rate:.2f}) "
          f"on {rt.entry.label}; outputs in {out}/")
    if rt.random_weights:
        print("vqfr: WARNING: these outputs come from RANDOM weights and are meaningless (see the message above)",
              file=sys.stderr)
    if stopped is not None:
        print(f"vqfr: error: stopped: {stopped}", file=sys.stderr)
        if not interrupted:
            return EXIT_ERROR
    if interrupted:
        what = "terminated" if signals.received == signal.SIGTERM else "interrupted"
        print(f"vqfr: {what}; every output written so far is complete (resume with --skip-existing)",
              file=sys.stderr)
        return EXIT_TERMINATED if signals.received == signal.SIGTERM else EXIT_INTERRUPTED
    return EXIT_SOME_FAILED if job.failed else EXIT_OK

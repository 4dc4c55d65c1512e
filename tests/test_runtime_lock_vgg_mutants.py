"""Round 24 mutation gaps: the CLI's signal guard and the runtime's lock.

- A signal while a chunk's writes are handed to the writer threads waits until every input of the chunk is handed
  out: the chunk is written and reported whole, and only then does the run stop.
- Two threads that meet a closed runtime load its engine once (the check-then-load of ``_ensure_loaded`` runs under
  the runtime's lock), and both get the model's output.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import vqfr.cli
from deploy.soak import MICRO_V2
from tests.conftest import TINY_V2, seeded_model
from tests.test_reliability_cli import _complete_sets, _run_cli
from tests.test_reliability_cli import _faces as _face_files
from tests.test_runtime import _faces
from vqfr.cli import EXIT_TERMINATED
from vqfr.runtime import Runtime

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --- the CLI's signal guard around handing out a chunk's writes -----------------------------------------------------
def test_a_signal_while_a_chunks_writes_are_handed_out_waits_for_the_whole_chunk(tmp_path, monkeypatch):
    """SIGTERM right after the first input of a two-input chunk is handed to a writer thread: the second is handed
    out and written too, both are reported, and the third input (next chunk) is never started."""
    signalled = []

    class SignalAfterFirstWrite(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            future = super().submit(fn, *args, **kwargs)
            if self._thread_name_prefix == "vqfr-write" and not signalled:
                signalled.append(fn)
                os.kill(os.getpid(), signal.SIGTERM)
            return future

    monkeypatch.setattr(vqfr.cli, "ThreadPoolExecutor", SignalAfterFirstWrite)
    inputs = _face_files(tmp_path / "in", 3)
    weights = vqfr.save_safetensors(seeded_model(MICRO_V2, seed=5), tmp_path / "micro_v2.safetensors")
    out = tmp_path / "out"
    code, stdout, stderr = _run_cli(["-i", str(tmp_path / "in"), "-o", str(out), "--weights", str(weights),
                                     "--aligned", "-q", "--batch", "2"])
    assert signalled and code == EXIT_TERMINATED and "terminated" in stderr
    assert _complete_sets(out, inputs) == (2, []) and not list(out.rglob("face0002*"))
    assert "2 images" in stdout and "0 failed" in stdout, stdout


# --- the runtime's lock around lazy loading -------------------------------------------------------------------------
@pytest.mark.parametrize("first", ["infer", "with"])
def test_two_threads_meeting_a_closed_runtime_load_the_engine_once(first):
    """Both threads find the engine closed (one entering ``with rt`` or inferring, the other inferring); the second
    waits for the first's load instead of loading it again (a second TensorRT engine or set of CUDA graphs on the
    GPU, built while the first is in use)."""
    rt = Runtime(seeded_model(TINY_V2, seed=1), device="cpu")
    x = torch.from_numpy(_faces(1, seed=3)).permute(0, 3, 1, 2).float() / 127.5 - 1
    expected = rt.infer(x, fidelity=0.5)
    rt.close()
    backend, loads, outputs, errors = rt.backend, [], [], []
    real_load, start = backend.load, threading.Barrier(2)

    def slow_load():
        loads.append(threading.get_ident())
        time.sleep(0.3)  # the other thread checks `loaded` meanwhile
        real_load()

    backend.load = slow_load

    def user(how):
        start.wait()
        try:
            if how == "with":
                rt.__enter__()
            else:
                outputs.append(rt.infer(x, fidelity=0.5))
        except Exception as exc:  # noqa: BLE001 - any failure is the bug
            errors.append(exc)

    threads = [threading.Thread(target=user, args=(how,)) for how in (first, "infer")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    rt.close()
    assert errors == [] and len(loads) == 1, (errors, loads)
    assert outputs and all(torch.equal(o, expected) for o in outputs)

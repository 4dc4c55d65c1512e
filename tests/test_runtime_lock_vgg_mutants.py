"""Round 24 mutation gaps: the CLI's signal guard and the runtime's lock, and the perceptual loss's VGG16.

- A signal while a chunk's writes are handed to the writer threads waits until every input of the chunk is handed
  out: the chunk is written and reported whole, and only then does the run stop.
- Two threads that meet a closed runtime load its engine once (the check-then-load of ``_ensure_loaded`` runs under
  the runtime's lock), and both get the model's output; ``device="cuda:N"`` reaches the backend (GPU N),
  and ``infer`` brings each batch's output back to the host.
- ``training.vgg``'s features equal torchvision's ``vgg16().features`` computed here by hand from the layout its
  source describes (conv 3x3 padding 1 with bias, ReLU, 2x2 max-pool of stride 2; LPIPS taps relu1_2 .. relu5_3),
  and the LPIPS distance equals one computed by hand with ImageNet's mean/std normalisation.
- ``load_vgg16`` takes ``.safetensors`` files and ``state_dict``-wrapped / ``module.``-prefixed checkpoints, refuses
  other shapes and a truncated ``.safetensors`` file with a CheckpointError, and never runs a pickle's code.
- The smoke-test random VGG16 is the same whatever the global seed and leaves the global RNG as it was; a style
  weight of 0 switches the style term off (None); the loss stays in evaluation mode.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

import vqfr.cli
from deploy.soak import MICRO_V2
from tests.conftest import TINY_V2, seeded_model
from tests.test_reliability import _evil_pickle
from tests.test_reliability_cli import _complete_sets, _run_cli
from tests.test_reliability_cli import _faces as _face_files
from tests.test_runtime import _faces
from training.losses import PerceptualLoss
from training.vgg import LPIPS_TAPS, load_vgg16
from vqfr.cli import EXIT_TERMINATED
from vqfr.errors import CheckpointError
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


def test_a_runtime_on_cuda_n_runs_its_backend_on_that_gpu(monkeypatch):
    """``device="cuda:1"`` reaches the backend (the model goes to GPU 1, not the current GPU); a stand-in GPU machine:
    the torch[cuda] row is usable and its load only records the device."""
    import vqfr.backends.torch as torch_backend

    loaded_on = []

    def load(self):
        self.arch, self.loaded = "VQFRv2", True
        loaded_on.append(self.device)

    monkeypatch.setattr(torch_backend, "cuda_missing", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stand-in GPU")
    monkeypatch.setattr(torch_backend.TorchBackend, "load", load)
    for device, want in (("cuda:1", torch.device("cuda", 1)), ("cuda", torch.device("cuda"))):
        rt = Runtime(seeded_model(TINY_V2, seed=1), backend="torch", device=device)
        assert rt.device == want and loaded_on[-1] == want and rt.entry.label == "torch[cuda]"


class _OnTheGPU(torch.Tensor):
    """Stands in for a tensor on a GPU: every operation keeps it there, only ``.cpu()`` gives a host tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        return out.as_subclass(torch.Tensor) if func is torch.Tensor.cpu else out


def test_infer_returns_host_tensors_batch_by_batch():
    """``Runtime.infer`` documents its output on the CPU: each batch the backend leaves on its GPU comes back to the
    host (a long batch never piles up in GPU memory)."""
    rt = Runtime(seeded_model(TINY_V2, seed=1), device="cpu", max_batch=1)
    x = torch.from_numpy(_faces(2, seed=4)).permute(0, 3, 1, 2).float() / 127.5 - 1
    expected = rt.infer(x, fidelity=0.5)
    real = rt.backend.infer
    rt.backend.infer = lambda *args: real(*args).as_subclass(_OnTheGPU)
    got = rt.infer(x, fidelity=0.5)
    assert type(got) is torch.Tensor and torch.equal(got, expected)


# --- VGG16 against torchvision's layout, computed by hand -----------------------------------------------------------
# torchvision's vgg16().features (configuration "D" of torchvision/models/vgg.py): a number is a 3x3 conv (padding 1,
# with bias) to that many channels, "R" a ReLU, "M" a 2x2 max-pool of stride 2; a layer's index is its position.
_TORCHVISION_VGG16 = "64 R 64 R M 128 R 128 R M 256 R 256 R 256 R M 512 R 512 R 512 R M 512 R 512 R 512 R M".split()
_LPIPS_LAYERS = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22, "relu5_3": 29}
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _torchvision_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-format vgg16 state dict with random He-scaled weights and non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    sd, cin = {}, 3
    for i, layer in enumerate(_TORCHVISION_VGG16):
        if layer not in ("R", "M"):
            cout = int(layer)
            sd[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
            sd[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.1
            cin = cout
    sd["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision files also hold the classifier
    return sd


def _by_hand(sd: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of torchvision's layers relu1_2 .. relu5_3 for an ImageNet-normalised image x."""
    out = []
    for i, layer in enumerate(_TORCHVISION_VGG16[:max(_LPIPS_LAYERS.values()) + 1]):
        if layer == "R":
            x = F.relu(x)
        elif layer == "M":
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        else:
            x = F.conv2d(x, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1)
        if i in _LPIPS_LAYERS.values():
            out.append(x)
    return out


def _images(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1


def _imagenet(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] -> (x - mean) / std with ImageNet's statistics."""
    mean, std = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


def test_vgg16_features_and_the_lpips_distance_match_torchvision_vgg16_by_hand(tmp_path):
    sd = _torchvision_weights()
    torch.save(sd, tmp_path / "vgg16-397923af.pth")
    x, y = _images()
    assert LPIPS_TAPS == tuple(_LPIPS_LAYERS.values())
    with torch.no_grad():
        got = load_vgg16(tmp_path / "vgg16-397923af.pth")(_imagenet(x), LPIPS_TAPS)
        want = _by_hand(sd, _imagenet(x))
    assert [tuple(f.shape) for f in got] == [(2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8), (2, 512, 4, 4),
                                             (2, 512, 2, 2)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)

    # LPIPS with uniform linear weights: sum over layers of the spatial mean of the squared difference of the
    # channel-normalised features, averaged over the batch
    loss = PerceptualLoss(perceptual_weight=0.5, vgg_weights=str(tmp_path / "vgg16-397923af.pth"),
                          lpips_weights="none")
    percep, _ = loss(x, y)
    expected = torch.zeros(2, dtype=torch.float64)
    for a, b in zip(_by_hand(sd, _imagenet(x)), _by_hand(sd, _imagenet(y)), strict=True):
        a, b = a.double(), b.double()
        a, b = a / (a.norm(dim=1, keepdim=True) + 1e-10), b / (b.norm(dim=1, keepdim=True) + 1e-10)
        expected += ((a - b) ** 2).sum(1).mean((1, 2))
    assert percep.item() == pytest.approx(0.5 * expected.mean().item(), rel=1e-4)


def test_vgg16_weights_load_from_safetensors_and_wrapped_checkpoints(tmp_path):
    """A ``.safetensors`` file, and a ``{"state_dict": ...}`` checkpoint saved from a DataParallel model
    (``module.features.N``), load the same weights as the plain torchvision file."""
    from safetensors.torch import save_file

    sd = _torchvision_weights(seed=1)
    save_file(sd, str(tmp_path / "vgg16.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "wrapped.pth")
    for name in ("vgg16.safetensors", "wrapped.pth"):
        vgg = load_vgg16(tmp_path / name)
        for k, v in vgg.state_dict().items():
            torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=f"{name}: {k}")


def test_a_truncated_safetensors_vgg16_file_is_a_checkpoint_error_naming_it(tmp_path):
    """An interrupted download of ``.safetensors`` weights: a CheckpointError naming the file and where to get the
    weights (the trainer prints it as one line), not safetensors' own traceback."""
    from safetensors.torch import save_file

    path = tmp_path / "vgg16.safetensors"
    save_file({"features.0.weight": torch.zeros(64, 3, 3, 3)}, str(path))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"vgg16.safetensors: is not a readable safetensors file .*vgg16-39792"):
        load_vgg16(path)


def test_vgg16_weights_of_other_shapes_or_that_run_code_are_refused(tmp_path, monkeypatch):
    sd = _torchvision_weights()
    sd["features.28.weight"] = sd["features.28.weight"][:, :256]  # a different network's layer
    torch.save(sd, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other.pth: has other shapes than VGG16 for \['features.28.weight'\]"):
        load_vgg16(tmp_path / "other.pth")

    pwned = tmp_path / "pwned"
    monkeypatch.setenv("VQFR_PWNED", str(pwned))
    with pytest.raises(CheckpointError):
        load_vgg16(_evil_pickle(tmp_path))
    assert not pwned.exists(), "the pickle's code ran"


# --- the smoke-test VGG16, the style switch, evaluation mode --------------------------------------------------------
def test_the_random_vgg_is_seeded_apart_from_the_global_rng():
    """``random_vgg``: the same VGG16 whatever the global seed (smoke runs are reproducible), and the global RNG
    continues as if no loss had been built (the training run's own random stream is not reset)."""
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    first = PerceptualLoss(random_vgg=True)
    after = torch.rand(4)
    torch.manual_seed(7)
    second = PerceptualLoss(random_vgg=True)
    torch.testing.assert_close(after, want, rtol=0, atol=0)
    for a, b in zip(first.vgg.parameters(), second.vgg.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_style_weight_of_0_switches_the_style_term_off_and_the_loss_stays_in_eval_mode():
    loss = PerceptualLoss(perceptual_weight=1.0, style_weight=0.0, random_vgg=True)
    x, y = _images(seed=2)
    percep, style = loss(x, y)
    assert style is None and percep is not None and percep.item() > 0
    assert not loss.training and not loss.vgg.training
    loss.train()  # a trainer's model.train() reaches it: a fixed metric stays in evaluation mode
    assert not loss.training and not loss.vgg.training

"""AOTInductor export: a tiny v1 (both custom ops) compiled on the CPU and compared with PyTorch, and the guard that
refuses custom ops whose real layout differs from their fake kernel's."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import kernels.ops  # noqa: F401  (registers torch.ops.vqfr.*)
from export import source
from export.aoti import custom_op_problems, export_aoti, fp16_model
from vqfr.errors import ConfigError, EngineError
from vqfr.sidecar import read_sidecar

#: A three-level VQFRv1 (16x16 inputs): every op of the full model, including both custom ops, compiled in ~1 minute.
SMALL_V1 = {
    "type": "VQFRv1", "base_channels": 32, "proj_patch_size": 4, "resolution_scale_rates": [1, 2, 2],
    "channel_multipliers": [1, 1, 2], "encoder_num_blocks": 1, "decoder_num_blocks": 1,
    "quant_level": ["Level_4"], "fix_keys": ["embedding"], "inpfeat_extraction_opt": {"in_dim": 3, "out_dim": 32},
    "align_from_patch": 4,
    "align_opt": {f"Level_{r}": {"cond_channels": 32, "cond_downscale_rate": r, "deformable_groups": 4}
                  for r in (4, 2, 1)},
    "quantizer_opt": {"Level_4": {"type": "L2VectorQuantizerKmeans", "in_dim": 64, "num_code": 32, "code_dim": 16}},
}
#: A three-level VQFRv2 (16x16 inputs, fidelity input, code predictor).
SMALL_V2 = {
    "type": "VQFRv2", "base_channels": 32, "channel_multipliers": [1, 1, 2], "num_enc_blocks": 1,
    "use_enc_attention": True, "num_dec_blocks": 1, "use_dec_attention": True, "code_dim": 16, "inpfeat_dim": 32,
    "align_opt": {"cond_channels": 32, "deformable_groups": 4}, "code_selection_mode": "Predict",
    "quantizer_opt": {"type": "L2VectorQuantizer", "num_code": 32, "code_dim": 16, "spatial_size": [4, 4]},
}


@torch.library.custom_op("vqfr_test::transposed_copy", mutates_args=())
def _transposed_copy(x: torch.Tensor) -> torch.Tensor:
    return x.t().contiguous().t()  # same values and shape, column-major strides


@_transposed_copy.register_fake
def _(x):
    return x.new_empty(x.shape)  # declares row-major strides


def test_layout_guard_reports_a_fake_kernel_that_lies_and_passes_honest_ones():
    x = torch.randn(3, 5)
    problems = custom_op_problems(probes={"bad": (torch.ops.vqfr_test.transposed_copy.default, (x,))})
    assert len(problems) == 1 and problems[0].startswith("bad:") and "tride" in problems[0]
    honest = {"nearest": (torch.ops.vqfr.nearest_code.default, (torch.randn(7, 4), torch.randn(5, 4)))}
    assert custom_op_problems(probes=honest) == []


def test_export_refuses_when_a_custom_op_layout_is_wrong(tmp_path, monkeypatch):
    monkeypatch.setattr("export.aoti.custom_op_problems", lambda device: ["vqfr::x: stride mismatch"])
    with pytest.raises(EngineError, match="fake kernel"):
        export_aoti(None, tmp_path / "m.pt2", config=SMALL_V1, random_weights=0, device="cpu", size=16)
    assert not (tmp_path / "m.pt2").exists()



def test_export_refuses_an_output_that_is_not_a_pt2_before_compiling(tmp_path, monkeypatch):
    """``-o vqfr.engine`` traced the model, then torch's own assertion ("Expect package path to be a file ending in
    .pt2") surfaced as "AOTInductor export failed ... Fix: report this with the torch version", naming a temporary
    file."""
    def trace(*args, **kwargs):
        raise AssertionError("traced before the request was refused")

    monkeypatch.setattr("export.aoti.trace_engine", trace)
    with pytest.raises(ConfigError, match=r"vqfr.engine: .*\.pt2.*Fix: name it vqfr.pt2"):
        export_aoti(None, tmp_path / "vqfr.engine", config=SMALL_V1, random_weights=0, device="cpu", size=16)
    assert not list(tmp_path.iterdir())

def test_export_refuses_to_overwrite_its_config_file(tmp_path, monkeypatch, capsys):
    """``--config`` is an input too: ``--config small.pt2.json -o small.pt2`` compiled the model, then wrote the
    sidecar over the config. Refused before tracing, from the CLI and the function."""
    import json

    import yaml

    from export.aoti import main
    from vqfr.errors import OutputError

    def trace(*args, **kwargs):
        raise AssertionError("traced before the request was refused")

    monkeypatch.setattr("export.aoti.trace_engine", trace)
    config = tmp_path / "small.pt2.json"
    config.write_text(json.dumps(SMALL_V1))
    argv = ["--random-weights", "0", "--config", str(config), "--device", "cpu", "--size", "16",
            "-o", str(tmp_path / "small.pt2")]
    assert main(argv) == 1
    assert f"the output would overwrite the input {config}" in capsys.readouterr().err
    named_pt2 = tmp_path / "options.pt2"  # a yml, oddly named: the output itself would replace it
    named_pt2.write_text(yaml.safe_dump(SMALL_V1))
    with pytest.raises(OutputError, match=r"options.pt2: the output would overwrite the input"):
        export_aoti(None, named_pt2, config=named_pt2, random_weights=0, device="cpu", size=16)
    assert json.loads(config.read_text()) == SMALL_V1 and yaml.safe_load(named_pt2.read_text()) == SMALL_V1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["options.pt2", "small.pt2.json"]


#: What torch 2.11-2.13 warn while compiling: Inductor deep-copies the graph, whose codegen holds a pytree LeafSpec.
LEAFSPEC_WARNING = ("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
                    "treespec.is_leaf()` instead.")


def test_export_silences_exactly_torchs_leafspec_warning(tmp_path, monkeypatch):
    """``aoti_compile_and_package`` printed a FutureWarning about ``LeafSpec`` on every export (torch 2.11-2.13;
    torch's own deepcopy of the graph, not a call of ours, fixed in 2.14). That warning is filtered around the
    compilation; any other warning from it still reaches the caller."""
    import copy

    from torch.utils import _pytree

    def compile_and_package(program, package_path, inductor_configs):
        copy.deepcopy(_pytree.treespec_leaf())  # what Inductor does (warns on torch < 2.14)
        warnings.warn(LEAFSPEC_WARNING, FutureWarning, stacklevel=1)  # the same, on every torch
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
        Path(package_path).write_bytes(b"package")
        return package_path

    monkeypatch.setattr("export.aoti.custom_op_problems", lambda device: [])
    monkeypatch.setattr("export.aoti.trace_engine", lambda *args: "program")
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_and_package)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_aoti(None, tmp_path / "m.pt2", config=SMALL_V1, random_weights=0, device="cpu", size=16)
    assert path.read_bytes() == b"package"
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == ["another deprecation"]


def test_fp16_model_keeps_the_last_conv_and_code_predictor_in_fp32():
    model = source.load_source_model(None, SMALL_V1, 0)
    half = fp16_model(model)
    assert half.main_decoder.conv_out[0].inner.weight.dtype == torch.float32
    assert half.encoder.conv_in.weight.dtype == torch.float16
    assert model.encoder.conv_in.weight.dtype == torch.float32  # the caller's model is left alone


@pytest.mark.slow
def test_aoti_cpu_package_matches_pytorch(tmp_path):
    assert custom_op_problems("cpu") == []  # the ops' real outputs have the layouts their fake kernels declare
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_aoti(None, tmp_path / "small_v1.pt2", config=SMALL_V1, random_weights=3, device="cpu", size=16)
    assert not [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    package = torch._inductor.aoti_load_package(str(path))
    model = source.load_source_model(None, SMALL_V1, 3)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(package(x), model(x), atol=1e-4, rtol=0)
        torch.testing.assert_close(package(x[1:2]), model(x[1:2]), atol=1e-4, rtol=0)
    meta = read_sidecar(path)
    assert (meta.arch, meta.precision, meta.face_size) == ("VQFRv1", "fp32", 16)
    assert meta.built_with["device"] == "cpu" and meta.extra["format"] == "aoti"
    assert [t.shape for t in meta.inputs] == [(-1, 3, 16, 16)]


@pytest.mark.parametrize("config", [SMALL_V1, SMALL_V2], ids=["v1", "v2"])
def test_fp16_engine_traces_with_fp32_inputs_and_output(config):
    """The fp16 program (compiled only on GPUs) takes and returns fp32, and its convolutions run in fp16."""
    from export.aoti import trace_engine

    model = source.load_source_model(None, config, 0)
    program = trace_engine(model, source.export_spec(model, size=16), "fp16", "cpu")
    inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in ("input", "fidelity")]
    assert len(inputs) == (2 if config is SMALL_V2 else 1)
    assert all(n.meta["val"].dtype == torch.float32 for n in inputs)
    (output,) = [n for n in program.graph.nodes if n.op == "output"][0].args[0]
    assert output.meta["val"].dtype == torch.float32
    conv_dtypes = [n.meta["val"].dtype for n in program.graph.nodes if "convolution" in str(n.target)
                   or "conv2d" in str(n.target)]
    # all but the last conv (v2 runs its shared conv_out twice: texture and main output)
    assert conv_dtypes.count(torch.float16) >= len(conv_dtypes) - 2 > 10


class _StandInPackage:
    """What torch._inductor.aoti_load_package returns, for a package compiled for float32 inputs of one batch
    (``batch``, or any with None): it records what it is given and returns ``2 * input``."""

    def __init__(self, batch: int | None = None):
        self.batch, self.calls = batch, []

    def __call__(self, *args):
        self.calls.append([(a.dtype, tuple(a.shape)) for a in args])
        assert self.batch is None or args[0].shape[0] == self.batch, "a compiled batch size"
        return [args[0] * 2]


def _aoti_backend(monkeypatch, tmp_path, package, *, precision: str, batch: int):
    from vqfr.backends.aoti import AOTIBackend
    from vqfr.backends.base import BACKENDS
    from vqfr.sidecar import EngineMeta, TensorSpec

    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path, device_index=-1: package)
    meta = EngineMeta(arch="VQFRv2", options={}, face_size=16, precision=precision,
                      inputs=(TensorSpec("input", (batch, 3, 16, 16)), TensorSpec("fidelity", (batch,))),
                      outputs=(TensorSpec("output", (batch, 3, 16, 16)),), extra={"device": "cpu"})
    row = next(e for e in BACKENDS if e.name == "aoti" and e.device == "cpu")
    backend = AOTIBackend(row, tmp_path / "m.pt2", meta=meta)
    backend.load()
    return backend


def test_aoti_backend_gives_fp16_packages_their_float32_inputs(monkeypatch, tmp_path):
    """An fp16 package takes float32 inputs (export_aoti compiles the casts in, see the test above). A package reads
    its inputs' memory as the dtype it was compiled for, so fp16 tensors came out as garbage, silently."""
    package = _StandInPackage()
    backend = _aoti_backend(monkeypatch, tmp_path, package, precision="fp16", batch=-1)
    x = torch.rand(3, 3, 16, 16)
    out = backend.infer(x, torch.tensor([0.0, 0.5, 1.0]))
    assert package.calls == [[(torch.float32, (3, 3, 16, 16)), (torch.float32, (3,))]]
    assert torch.equal(out, x * 2)


def test_aoti_backend_serves_a_package_with_a_fixed_batch(monkeypatch, tmp_path):
    """``export.aoti --batch 2`` compiles for batch 2 only: the runtime sends at most 2 faces and a single face is
    padded to 2 (the output keeps 1)."""
    package = _StandInPackage(batch=2)
    backend = _aoti_backend(monkeypatch, tmp_path, package, precision="fp32", batch=2)
    assert backend.max_batch == 2
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(backend.infer(x, torch.zeros(1)), x * 2)
    assert package.calls == [[(torch.float32, (2, 3, 16, 16)), (torch.float32, (2,))]]


def _cuda_package_on(monkeypatch, tmp_path, device: str, built_cc: str):
    """An AOTIBackend on ``device`` of a machine whose cuda:0 is 9.0 and cuda:1 8.6, for a package compiled for
    ``built_cc``; returns (backend, the keyword arguments aoti_load_package got)."""
    from vqfr.backends.aoti import AOTIBackend
    from vqfr.backends.base import BACKENDS
    from vqfr.sidecar import EngineMeta, TensorSpec

    got: dict = {}
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path, **kw: got.update(kw) or _StandInPackage())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda d=None: (8, 6) if torch.device(d if d is not None else "cuda:0").index == 1 else (9, 0))
    meta = EngineMeta(arch="VQFRv2", options={}, face_size=16, precision="fp16",
                      inputs=(TensorSpec("input", (-1, 3, 16, 16)),), outputs=(TensorSpec("output", (-1, 3, 16, 16)),),
                      built_with={"compute_capability": built_cc}, extra={"device": "cuda"})
    row = next(e for e in BACKENDS if e.name == "aoti" and e.device == "cuda")
    return AOTIBackend(row, tmp_path / "m.pt2", meta=meta, device=device), got


def test_aoti_backend_loads_onto_the_gpu_asked_for_and_checks_that_gpus_architecture(monkeypatch, tmp_path):
    """``device="cuda:1"``: the package is loaded onto GPU 1 (it loaded onto the current GPU, and the inputs sent to
    cuda:1 then met weights on cuda:0), and a package compiled for another compute capability than GPU 1's is
    refused by name (only the current GPU's was compared)."""
    backend, got = _cuda_package_on(monkeypatch, tmp_path, "cuda:1", built_cc="8.6")
    backend.load()
    assert got == {"device_index": 1}
    backend, got = _cuda_package_on(monkeypatch, tmp_path, "cuda:1", built_cc="9.0")
    with pytest.raises(EngineError, match=r"compute capability 9\.0, cuda:1 is 8\.6") as err:
        backend.load()
    assert err.value.path == tmp_path / "m.pt2" and "CUDA_VISIBLE_DEVICES=1" in err.value.fix and not got
    backend, got = _cuda_package_on(monkeypatch, tmp_path, "cuda", built_cc="9.0")
    backend.load()
    assert got == {"device_index": -1}  # plain "cuda": the current GPU, aoti_load_package's default


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("precision,check", [("fp32", "max_abs"), ("fp16", "psnr")])
def test_aoti_cuda_package_matches_pytorch(precision, check, tmp_path):
    if custom_op_problems("cuda"):
        pytest.skip(f"custom op layouts disagree with their fake kernels on CUDA: {custom_op_problems('cuda')}")
    from export.compare import agreement

    path = export_aoti(None, tmp_path / f"small_v2_{precision}.pt2", config=SMALL_V2, random_weights=3,
                       device="cuda", precision=precision)
    package = torch._inductor.aoti_load_package(str(path))
    model = source.load_source_model(None, SMALL_V2, 3).cuda()
    x = (torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1).cuda()
    f = torch.tensor([0.0, 1.0, 0.5], device="cuda")
    with torch.no_grad():
        result = agreement(package(x, f), model(x, fidelity=f))
    assert result.max_abs <= 1e-3 if check == "max_abs" else result.psnr_db >= 45.0, str(result)


# --- Isolating the AOTInductor CUDA crash -------------------------------------------------------------------------
# On the H100 (torch 2.11) the small v2 package compiled, then torch._inductor.aoti_load_package segfaulted. These
# three packages tell the loader from our ops: no custom op at all, the deformable conv alone, the code search alone.
# A segfault kills the process, so deploy.gpu_check runs each in its own pytest process, with PYTHONFAULTHANDLER=1.


class _PlainConvs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.GroupNorm(4, 8),
                                        torch.nn.SiLU(), torch.nn.Conv2d(8, 8, 3, padding=1))

    def forward(self, x):
        return self.body(x)


class _DeformOnly(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.weight = torch.nn.Parameter(torch.randn(8, 8, 3, 3, generator=g) * 0.1)
        self.bias = torch.nn.Parameter(torch.randn(8, generator=g) * 0.1)

    def forward(self, x, offset, mask):
        return torch.ops.vqfr.modulated_deform_conv2d(x, offset, mask, self.weight, self.bias, [1, 1], [1, 1], [1, 1])


class _NearestOnly(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.codebook = torch.nn.Parameter(torch.randn(32, 16, generator=torch.Generator().manual_seed(2)))

    def forward(self, z):
        return torch.ops.vqfr.nearest_code(z, self.codebook)[0]


def _isolating_case(name: str):
    g = torch.Generator().manual_seed(0)
    if name == "plain":
        return _PlainConvs(), (torch.randn(2, 8, 12, 12, generator=g),)
    if name == "deform":
        return _DeformOnly(), (torch.randn(2, 8, 12, 12, generator=g), torch.randn(2, 2 * 2 * 9, 12, 12, generator=g),
                               torch.rand(2, 2 * 9, 12, 12, generator=g))
    return _NearestOnly(), (torch.randn(40, 16, generator=g),)


_CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="no CUDA GPU")])


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", _CUDA])
@pytest.mark.parametrize("name", ["plain", "deform", "nearest"])
def test_aoti_isolating_package_loads_and_matches(name, device, tmp_path):
    """On the CPU (about 40 s for the three) this proves the cases themselves; on CUDA it is the diagnosis."""
    module, inputs = _isolating_case(name)
    module, inputs = module.to(device).eval(), tuple(t.to(device) for t in inputs)
    with torch.no_grad():
        expected = module(*inputs)
        program = torch.export.export(module, inputs, strict=False)
        path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / f"{name}.pt2"))
        package = torch._inductor.aoti_load_package(path)
        result = package(*inputs)
    if name == "nearest":
        assert torch.equal(result, expected)
    else:
        torch.testing.assert_close(result, expected, atol=1e-4, rtol=1e-4)


class _CodeSnap(torch.nn.Module):
    """An engine-shaped module ([1, 3, 16, 16] -> [1, 3, 16, 16]) whose only custom op is the code search: each pixel
    snaps to its nearest codebook colour."""

    def __init__(self):
        super().__init__()
        self.codebook = torch.nn.Parameter(torch.rand(8, 3, generator=torch.Generator().manual_seed(4)) * 2 - 1)

    def forward(self, input):  # noqa: A002 - the engine's input name
        z = input.permute(0, 2, 3, 1).reshape(-1, 3)
        idx = torch.ops.vqfr.nearest_code(z, self.codebook)[0]
        return self.codebook[idx].reshape(input.shape[0], 16, 16, 3).permute(0, 3, 1, 2)


def test_runtime_loads_a_cpu_package_in_a_fresh_process(tmp_path):
    """``vqfr.Runtime("model.pt2")`` in a process that had not imported kernels.ops failed: "is not a loadable
    AOTInductor package (Could not find schema for vqfr::nearest_code ...)". The backend registers the ops first."""
    import subprocess
    import sys

    from tests.conftest import ROOT
    from vqfr.sidecar import EngineMeta, TensorSpec, write_sidecar

    module = _CodeSnap().eval()
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        expected = module(x)
        program = torch.export.export(module, (x,), strict=False)
        path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "snap.pt2"))
    write_sidecar(path, EngineMeta(arch="VQFRv1", options={"type": "VQFRv1"}, face_size=16, precision="fp32",
                                   inputs=(TensorSpec("input", (1, 3, 16, 16)),),
                                   outputs=(TensorSpec("output", (1, 3, 16, 16)),),
                                   built_with={"torch": torch.__version__, "device": "cpu"}))
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    script = ("import sys, torch, vqfr\n"
              "assert 'kernels.ops' not in sys.modules\n"
              "io = torch.load(sys.argv[2], weights_only=True)\n"
              "out = vqfr.Runtime(sys.argv[1], backend='aoti', device='cpu').infer(io['x'])\n"
              "assert torch.equal(out, io['expected']), (out - io['expected']).abs().max()\n")
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "io.pt")], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

"""The fast path of the torch backend (``mode="max"``) on the CPU: fp32 islands, channels-last, the fidelity-0
graph, static batch keys and torch.compile tracing, and the CUDA-graph bookkeeping (static buffers, copies handed
out, the warm-up cache released) through a stand-in for torch.cuda's graph API (a real capture needs a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vqfr
from tests.conftest import TINY_V1, TINY_V2, seeded_model
from tests.test_bench import SMALL_V1, SMALL_V2
from vqfr.backends import BACKENDS
from vqfr.backends.torch import TorchBackend
from vqfr.backends.torch_fast import FastOptions, Float32Island, island_names, with_fp32_islands
from vqfr.errors import ConfigError
from vqfr.models.blocks import AttnBlock

CPU = next(e for e in BACKENDS if e.label == "torch[cpu]")


def forward(model, x, fidelity):
    return model(x, fidelity=fidelity) if model.options["type"] == "VQFRv2" else model(x)


@pytest.mark.parametrize("options", [TINY_V1, TINY_V2], ids=["v1", "v2"])
def test_islands_wrap_norms_attention_code_selection_and_the_last_conv(options):
    model = seeded_model(copy.deepcopy(options))
    half = with_fp32_islands(model, torch.bfloat16)
    islands = set(island_names(half))
    norms = {n for n, m in model.named_modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))}
    attention = {n for n, m in model.named_modules() if isinstance(m, AttnBlock)}
    inside_attention = {n for n in norms if any(n.startswith(a + ".") for a in attention)}
    expected = (norms - inside_attention) | attention
    if options["type"] == "VQFRv2":
        expected = (expected - {"feat2index.0"}) | {"feat2index", "decoder.conv_out.2"}
    else:
        expected |= {"quantizer.quantize_dict.Level_32", "main_decoder.conv_out.0"}
    assert islands == expected
    for name, module in half.named_modules():
        params = list(module.parameters(recurse=False))
        inside = any(name == i or name.startswith(i + ".") for i in islands)
        assert all(p.dtype == (torch.float32 if inside else torch.bfloat16) for p in params), name
    # The caller's model is left alone.
    assert not island_names(model) and all(p.dtype == torch.float32 for p in model.parameters())
    assert with_fp32_islands(model, torch.float32) is not model and not island_names(with_fp32_islands(model,
                                                                                                          torch.float32))


def test_an_island_computes_in_fp32_and_rounds_once():
    norm = nn.GroupNorm(4, 8, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1, 0.1)
        norm.bias.normal_(0, 0.1)
    island = Float32Island(copy.deepcopy(norm))
    x = torch.randn(2, 8, 5, 7).half()
    out = island(x)
    assert out.dtype == torch.float16
    assert torch.equal(out, norm(x.float()).half())
    logits = Float32Island(nn.Linear(8, 3), cast_back=False)(torch.randn(4, 8).bfloat16())
    assert logits.dtype == torch.float32  # v2's code logits reach the argmax in fp32


def test_fp32_normalisation_survives_activations_that_overflow_fp16_statistics():
    """Activations of a few hundred are ordinary in fp16 storage (max 65504), but their squares are not: a
    GroupNorm whose statistics are computed in fp16 (as a naive decomposition, an exporter or a compiler without
    upcasting would) overflows. The island computes them in fp32 and matches float64 to fp16 output rounding."""
    gen = torch.Generator().manual_seed(0)
    x = (300 + 40 * torch.randn(2, 32, 6, 6, generator=gen)).half()
    norm = nn.GroupNorm(32, 32, eps=1e-6)
    exact = F.group_norm(x.double(), 32, eps=1e-6)
    ours = Float32Island(copy.deepcopy(norm))(x)
    assert torch.isfinite(ours).all()
    assert (ours.double() - exact).abs().max() < 4e-3  # fp16 spacing at |y| ~ 2-4 is 2e-3
    # The hazard the island removes: the same statistics in fp16.
    g = x.reshape(2, 32, -1)
    var_fp16 = (g * g).mean(-1) - g.mean(-1) ** 2
    assert not torch.isfinite(var_fp16).all()


@pytest.mark.parametrize("options", [SMALL_V1, SMALL_V2], ids=["v1", "v2"])
def test_reduced_precision_with_islands_stays_close_to_fp32(options):
    """The whole model in fp16 (CPU kernels) with fp32 islands: the same codes as fp32 and rounding-level error."""
    model = seeded_model(copy.deepcopy(options), seed=1)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    kwargs = {"fidelity": 1.0} if options["type"] == "VQFRv2" else {}
    with torch.no_grad():
        ref = model(x, return_all=True, **kwargs)
        out = with_fp32_islands(model, torch.float16)(x.half(), return_all=True, **kwargs)
    assert out["main_dec"].dtype == torch.float16
    codes = (out["code_indices"], ref["code_indices"])
    if isinstance(codes[0], dict):
        codes = (codes[0]["Level_4"], codes[1]["Level_4"])
    assert torch.equal(*codes)
    if options["type"] == "VQFRv2":
        assert out["quant_logit"].dtype == torch.float32  # logits leave their island in fp32
    mse = ((out["main_dec"].float().clamp(-1, 1) - ref["main_dec"].clamp(-1, 1)) / 2).pow(2).mean()
    assert 10 * torch.log10(1 / mse) > 50  # measured ~60 dB; a wrong island (or bf16) lands far below


@pytest.mark.parametrize("options", [SMALL_V1, SMALL_V2], ids=["v1", "v2"])
def test_max_mode_on_the_cpu_matches_the_reference(options):
    model = seeded_model(copy.deepcopy(options), seed=2)
    gen = torch.Generator().manual_seed(2)
    with TorchBackend(CPU, model, mode="max") as be:
        assert be.precision == "fp32" and be.runner is not None and not be.fast.compile and not be.fast.cuda_graphs
        assert be.model is not model and next(be.model.parameters()).device.type == "cpu"
        for fid in ([0.0, 0.5, 1.0], [0.0, 0.0], [1.0, 1.0, 0.25]):
            x = torch.rand(len(fid), 3, 16, 16, generator=gen) * 2 - 1
            f = torch.tensor(fid)
            with torch.no_grad():
                ref = forward(model, x, f)
            out = be.infer(x, f)
            assert out.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
        keys = set(be.runner.prepare_s)
    if options["type"] == "VQFRv2":  # batch 2 all-zero ran the texture-only graph
        assert keys == {(3, False), (2, True)}
    else:
        assert keys == {(3, False), (2, False)}
    assert next(model.parameters()).dtype == torch.float32 and not model.training


def test_max_mode_defaults_and_errors(monkeypatch):
    model = seeded_model(copy.deepcopy(TINY_V2))
    assert FastOptions().resolved(torch.device("cuda")).compile
    assert FastOptions().resolved(torch.device("cuda")).cuda_graphs
    assert FastOptions(cuda_graphs=True).resolved(torch.device("cpu")).cuda_graphs is False
    monkeypatch.setenv("VQFR_TORCH_MODE", "max")
    assert TorchBackend(CPU, model).mode == "max"
    monkeypatch.setenv("VQFR_TORCH_MODE", "fastest")
    with pytest.raises(ConfigError, match="VQFR_TORCH_MODE"):
        TorchBackend(CPU, model)
    monkeypatch.delenv("VQFR_TORCH_MODE")
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        TorchBackend(CPU, model, precision="bf16").load()  # eager keeps the CPU in fp32
    with TorchBackend(CPU, model, precision="bf16", mode="max") as be:  # the max mode may (tests use it)
        assert be.infer(torch.rand(1, 3, 64, 64) * 2 - 1, torch.ones(1)).dtype == torch.bfloat16


@pytest.mark.parametrize("options", [SMALL_V1, SMALL_V2], ids=["v1", "v2"])
def test_max_mode_compiles_the_whole_model_as_one_graph(options):
    """torch.compile(fullgraph=True) raises on any graph break; aot_eager checks the tracing without the compile
    time of Inductor's C++ on a 2-core CPU. On a GPU the same code runs with Inductor and CUDA graphs."""
    torch._dynamo.reset()
    model = seeded_model(copy.deepcopy(options), seed=3)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    f = torch.tensor([0.3, 1.0])
    with torch.no_grad():
        ref = forward(model, x, f)
    fast = FastOptions(compile=True, compile_backend="aot_eager")
    with TorchBackend(CPU, model, mode="max", fast=fast) as be:
        torch.testing.assert_close(be.infer(x, f), ref, atol=1e-4, rtol=0)
        if options["type"] == "VQFRv2":
            with torch.no_grad():
                torch.testing.assert_close(be.infer(x, torch.zeros(2)), model(x, fidelity=0.0), atol=1e-4, rtol=0)


def test_runtime_runs_the_max_mode_from_the_environment(monkeypatch):
    monkeypatch.setenv("VQFR_TORCH_MODE", "max")
    model = seeded_model(copy.deepcopy(TINY_V2))
    with vqfr.Runtime(model, backend="torch", device="cpu") as rt:
        assert rt.backend.mode == "max"
        x = torch.rand(1, 3, 64, 64) * 2 - 1
        with torch.no_grad():
            torch.testing.assert_close(rt.infer(x, 0.5), model(x, fidelity=0.5), atol=1e-4, rtol=0)


def test_cuda_graph_path_replays_new_inputs_hands_out_copies_and_releases_the_warm_up_cache(monkeypatch):
    """FastRunner's CUDA-graph path with torch.cuda's graph API replaced by a stand-in with the same contract: a
    capture records the forward on the static input buffers, a replay recomputes it from whatever those buffers hold
    now into the static output. Each (batch, fidelity kind) is warmed up three times and captured once; every call
    copies its input into the static buffers (a replay of the first input would be wrong); the caller gets a copy,
    which the next replay leaves alone; and the cache of the warm-up is released after each capture."""
    import contextlib
    import types

    from vqfr.backends.torch_fast import FastRunner

    events: list[str] = []

    class Graph:
        capturing: Graph | None = None

        def replay(self):
            fn, args, out = self.recorded
            events.append("replay")
            out.copy_(fn(*args))

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None):
        assert pool is not None and stream is not None
        events.append("capture")
        Graph.capturing = g
        yield
        Graph.capturing = None

    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    fake = {"graph_pool_handle": lambda: object(), "Stream": lambda device: stream,
            "current_stream": lambda device: stream, "stream": lambda s: contextlib.nullcontext(),
            "CUDAGraph": Graph, "graph": graph, "synchronize": lambda device=None: None,
            "empty_cache": lambda: events.append("empty_cache")}
    for name, value in fake.items():
        monkeypatch.setattr(torch.cuda, name, value)

    model = seeded_model(copy.deepcopy(TINY_V2))
    runner = FastRunner(model, "VQFRv2", torch.device("cpu"), torch.float32,
                        FastOptions(compile=False, cuda_graphs=True, channels_last=True))
    function = runner._function

    def recording(key):
        fn = function(key)

        def call(x, f):
            out = fn(x, f)
            if Graph.capturing is not None:
                Graph.capturing.recorded = (fn, (x, f), out)
            events.append("forward")
            return out
        return call

    monkeypatch.setattr(runner, "_function", recording)
    size = runner.model.options["quantizer_opt"]["spatial_size"][0] * 32
    gen = torch.Generator().manual_seed(3)
    x1, x2, x3 = (torch.rand(1, 3, size, size, generator=gen) * 2 - 1 for _ in range(3))
    ones, zeros = torch.ones(1), torch.zeros(1)
    with torch.no_grad():
        want1, want2 = model(x1, fidelity=ones), model(x2, fidelity=torch.tensor([0.25]))
        want3 = model(x3, fidelity=0.0)
    first = runner(x1, ones)
    assert events == ["forward"] * 3 + ["capture", "forward", "empty_cache", "replay"]
    torch.testing.assert_close(first, want1, rtol=1e-5, atol=1e-5)
    events.clear()
    second = runner(x2, torch.tensor([0.25]))  # same key: replayed with the new input and fidelity
    assert events == ["replay"]
    torch.testing.assert_close(second, want2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first, want1, rtol=1e-5, atol=1e-5)  # the first result is the caller's own copy
    events.clear()
    third = runner(x3, zeros)  # all at fidelity 0: the texture-only graph, captured once more
    assert events == ["forward"] * 3 + ["capture", "forward", "empty_cache", "replay"]
    torch.testing.assert_close(third, want3, rtol=1e-5, atol=1e-5)
    assert set(runner._graphs) == {(1, False), (1, True)} and set(runner.prepare_s) == {(1, False), (1, True)}

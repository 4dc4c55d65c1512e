"""What mutation testing (round 15) of the max mode's fast path (``vqfr.backends.torch_fast``), the fp16 rewrite of
ONNX graphs (``export.fp16``) and ``kernels.aot_check`` found unchecked, pinned here:

- ``FastOptions`` defaults: channels-last and the fp32 islands on, the fused GroupNorm off, Inductor; a LayerNorm
  outside ``feat2index`` is an island like every GroupNorm (VQFR's one LayerNorm sits inside it); v2 in fp16 has
  ``feat2index`` (logits out in fp32) and ``decoder.conv_out.2`` (the image, back in fp16) as islands with fp32
  weights beside fp16 convolutions; an island hands its inner module fp32 copies of every floating input (a product
  that overflows fp16 comes out right);
- ``FastRunner`` passes ``compile_mode`` and ``compile_backend`` to torch.compile and, without Triton, runs the
  compiled function with Inductor's layout optimisation off for the call only; a runner on CUDA turns on
  ``cudnn.benchmark``; fidelities reach the model as fp32 tensors and an all-zero batch as the texture-only call
  (``fidelity=0.0``); ``close`` lets go of the model, the compiled functions and the graphs;
- the CUDA-graph bookkeeping (torch.cuda's graph API replaced by a recording stand-in, as in test_bench_fast.py):
  every capture shares one pool and one side stream, which waits for the current stream before each warm-up and
  which the current stream waits for before the capture; the static input has the layout asked for; the static
  fidelity is the runner's own buffer, so the next call does not write into the caller's tensor;
- ``export.fp16`` on hand-built graphs: ``mark_fp32`` tags only the nodes between the inputs and the outputs; the
  last conv is the Conv writing a graph output (fp32 weight and input, the other Conv on an fp16 copy) and a graph
  ending in another op has none; Softmax, LayerNormalization, ArgMin and ArgMax are islands and integer outputs stay
  integers; one Cast per tensor and direction (two fp32 readers share it), none in front of ``Shape``, Resize's
  scales left fp32, outputs kept fp32 under their own names, the count of Casts and copies returned; Casts and
  Constants keep their type; ``fp32_node_names`` lists named nodes only; an initializer that is a graph output
  survives; ``island_reasons`` counts one anchor per tagged island; the DeformConv stays fp32 unless
  ``dcn_fp16=True`` (then the fp32 weights are dropped); ``dcn_to_fp16`` bypasses the Casts around it (keeping one
  another node still reads, dropping one nothing reads), never hands it an int tensor, removes its tag, returns how
  many it moved and moves nothing the second time;
- ``kernels.aot_check``: the argument specialisation (pointer types, the constant 1, i32/i64 bounds, 16-divisibility,
  bools), the REG/STACK parsing and its refusal, blocks per SM from registers and shared memory with each
  capability's limits (a config using exactly the SM's shared memory fits), ``only`` and ``max_configs`` after the
  kernel's own pruning, failed compiles reported as rows, the refusal under the interpreter, the CLI's flags and its
  fp16 + fp32 default, and the GroupNorm launches in both layouts (Triton's compiler and cuobjdump stubbed).

Expected values are written out by hand (dtypes, names, counts, strides, arithmetic) or come from stand-ins; tiny
models and graphs, on the CPU. The round also found the recompile-limit test of tests/test_runtime.py breaking every
later torch.compile in its process (pytest's monkeypatch on ``torch._dynamo.config``); fixed there."""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch
from torch import nn

from kernels import dispatch
from tests.conftest import seeded_model
from tests.test_bench import SMALL_V2
from vqfr.backends.torch_fast import FastOptions, FastRunner, Float32Island, with_fp32_islands

try:
    from onnxscript import ir

    from export import fp16
except ImportError:  # the fp16 rewrite needs onnxscript
    ir = fp16 = None

needs_triton = pytest.mark.skipif(not dispatch.triton_installed(), reason="triton is not installed")
needs_onnx = pytest.mark.skipif(fp16 is None, reason="onnxscript is not installed")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors; two threads only spin on a busy 2-core machine


# ------------------------------------------------------------------------------------------- vqfr.backends.torch_fast
def test_the_fast_options_defaults_are_the_documented_ones():
    """channels_last and the fp32 islands on, the fused GroupNorm off (not yet measured on a GPU), Inductor."""
    options = FastOptions()
    assert (options.channels_last, options.fp32_islands, options.fused_group_norm) == (True, True, False)
    assert (options.compile, options.cuda_graphs, options.compile_mode, options.compile_backend) == (
        None, None, None, "inductor")


def test_fp16_islands_by_name_with_their_dtypes_written_out():
    """v2 in fp16: the norms, the attention blocks, ``feat2index`` (logits out in fp32) and ``decoder.conv_out.2``
    (the image, handed back in fp16) are islands with fp32 weights; the convolutions around them are fp16."""
    model = seeded_model(copy.deepcopy(SMALL_V2))
    half = with_fp32_islands(model, torch.float16)
    islands = dict(half.named_modules())
    for name in ("feat2index", "decoder.conv_out.2", "decoder.conv_out.0"):
        assert isinstance(islands[name], Float32Island), name
    assert islands["feat2index"].cast_back is False and islands["decoder.conv_out.2"].cast_back is True
    assert islands["decoder.conv_out.2"].inner.weight.dtype == torch.float32
    assert half.decoder.conv_out[0].inner.weight.dtype == torch.float32  # its GroupNorm
    assert half.get_submodule("decoder.conv_in").weight.dtype == torch.float16
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).half() * 2 - 1
    with torch.no_grad():
        assert islands["decoder.conv_out.2"](torch.randn(1, 32, 4, 4).half()).dtype == torch.float16
        assert half(x, fidelity=1.0).dtype == torch.float16


def test_every_group_norm_and_layer_norm_of_any_model_is_an_island():
    """VQFR's one LayerNorm sits inside ``feat2index`` (an island already); a LayerNorm elsewhere is one too."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4), nn.Flatten(), nn.LayerNorm(16), nn.Linear(16, 2))
    half = with_fp32_islands(model, torch.float16)
    assert [n for n, m in half.named_children() if isinstance(m, Float32Island)] == ["1", "3"]
    assert [p.dtype for p in half.parameters()] == [torch.float16] * 2 + [torch.float32] * 4 + [torch.float16] * 2
    assert half(torch.rand(2, 3, 2, 2).half()).dtype == torch.float16


def test_an_island_casts_its_inputs_to_fp32_and_only_floating_outputs_back():
    """Inside the island every floating input is fp32, whatever the caller's dtype."""
    class Probe(nn.Module):
        def forward(self, a, b):
            self.seen = (a.dtype, b.dtype)
            return a * a / b, torch.argmax(a, dim=-1)

    island = Float32Island(Probe())
    out, index = island(torch.full((2, 3), 300.0, dtype=torch.float16), torch.full((2, 3), 300.0,
                                                                                  dtype=torch.float16))
    assert island.inner.seen == (torch.float32, torch.float32)
    assert out.dtype == torch.float16 and index.dtype == torch.int64
    assert torch.equal(out, torch.full((2, 3), 300.0, dtype=torch.float16))  # 300 * 300 overflows fp16, not fp32


def test_the_runner_compiles_with_the_options_mode_and_backend(monkeypatch):
    """``compile_mode`` and ``compile_backend`` reach torch.compile (fullgraph, static shapes), and without Triton
    the compiled function runs with Inductor's layout optimisation off."""
    from kernels import ops
    from vqfr.backends import torch_fast

    calls = []

    def compile(fn, **kwargs):
        calls.append(kwargs)
        return lambda *args: (torch._inductor.config.layout_optimization, fn(*args))

    monkeypatch.setattr(torch, "compile", compile)
    monkeypatch.setattr(ops, "TRITON_OPS", False)
    options = FastOptions(compile=True, compile_mode="max-autotune-no-cudagraphs", compile_backend="eager",
                          channels_last=False).resolved(torch.device("cpu"))
    runner = torch_fast.FastRunner(nn.Identity(), "VQFRv1", torch.device("cpu"), torch.float32, options)
    layout_optimization, out = runner(torch.ones(1, 3, 2, 2), torch.ones(1))
    assert calls == [dict(fullgraph=True, dynamic=False, mode="max-autotune-no-cudagraphs", backend="eager")]
    assert layout_optimization is False and torch.equal(out, torch.ones(1, 3, 2, 2))
    assert torch._inductor.config.layout_optimization is True  # patched for the call only


def test_a_runner_on_cuda_turns_on_cudnn_benchmark(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    FastRunner(nn.Identity(), "VQFRv1", torch.device("cpu"), torch.float32, FastOptions(compile=False,
                                                                                         cuda_graphs=False))
    assert torch.backends.cudnn.benchmark is False
    FastRunner(nn.Identity(), "VQFRv1", torch.device("cuda"), torch.float16, FastOptions(compile=False,
                                                                                          cuda_graphs=False))
    assert torch.backends.cudnn.benchmark is True


class _Seen(nn.Module):
    """v2's call signature; records what it is handed and returns x + fidelity."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, fidelity):
        self.calls.append((x.dtype, x.is_contiguous(memory_format=torch.channels_last), fidelity))
        f = fidelity if isinstance(fidelity, torch.Tensor) else torch.full((x.shape[0],), float(fidelity))
        return x + f.to(x.dtype).view(-1, 1, 1, 1)


def test_the_runner_hands_fidelities_as_fp32_and_zero_fidelity_as_the_texture_only_call():
    model = _Seen()
    runner = FastRunner(model, "VQFRv2", torch.device("cpu"), torch.float32,
                        FastOptions().resolved(torch.device("cpu")))
    x = torch.zeros(2, 3, 2, 2)
    out = runner(x, torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert model.calls[-1][2].dtype == torch.float32 and torch.equal(out[:, 0, 0, 0], torch.tensor([0.5, 0.0]))
    runner(x, torch.zeros(2, dtype=torch.float64))
    assert model.calls[-1][2] == 0.0  # the texture branch only (a float, not a tensor of zeros)
    runner(x, torch.tensor([0.0, 1.0]))
    assert isinstance(model.calls[-1][2], torch.Tensor)
    assert set(runner.prepare_s) == {(2, False), (2, True)}


def test_close_lets_go_of_the_model_and_the_graphs():
    runner = FastRunner(nn.Identity(), "VQFRv1", torch.device("cpu"), torch.float32,
                        FastOptions().resolved(torch.device("cpu")))
    runner(torch.ones(1, 3, 2, 2), torch.ones(1))
    runner._graphs[(1, False)] = object()
    runner.close()
    assert runner.model is None and not runner._graphs and not runner._compiled


@pytest.fixture
def fake_graphs(monkeypatch):
    """torch.cuda's graph API replaced by a recording stand-in with the same contract as the one in
    tests/test_bench_fast.py: a capture records the forward on the static buffers, a replay recomputes it into the
    static output; pools, streams and stream waits are recorded."""
    import contextlib

    log: dict = {"events": [], "pools": [], "captures": []}

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            log["events"].append(f"{self.name} waits for {other.name}")

    current = Stream("current")

    class Graph:
        capturing = None

        def replay(self):
            fn, args, out = self.recorded
            out.copy_(fn(*args))

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None):
        log["captures"].append((pool, stream))
        Graph.capturing = g
        yield
        Graph.capturing = None

    @contextlib.contextmanager
    def on(stream):
        log["events"].append(f"warm-up on {stream.name}")
        yield

    pools = iter(range(100))
    fake = {"graph_pool_handle": lambda: log["pools"].append(next(pools)) or log["pools"][-1],
            "Stream": lambda device: log["events"].append("new stream") or Stream("side"),
            "current_stream": lambda device: current,
            "stream": on, "CUDAGraph": Graph, "graph": graph, "synchronize": lambda device=None: None,
            "empty_cache": lambda: None}
    for name, value in fake.items():
        monkeypatch.setattr(torch.cuda, name, value)

    def recording(runner):
        function = runner._function

        def wrapped(key):
            fn = function(key)

            def call(x, f):
                out = fn(x, f)
                if Graph.capturing is not None:
                    Graph.capturing.recorded = (fn, (x, f), out)
                return out
            return call
        monkeypatch.setattr(runner, "_function", wrapped)
        return runner

    log["recording"] = recording
    return log


def test_every_capture_shares_one_pool_and_one_side_stream_synchronised_both_ways(fake_graphs):
    """The graphs of all keys share one memory pool and capture on the stream of their warm-up, which first waits
    for the current stream's work (the input copy) and which the current stream waits for before the capture."""
    model = _Seen()
    options = FastOptions(compile=False, cuda_graphs=True)
    runner = fake_graphs["recording"](FastRunner(model, "VQFRv2", torch.device("cpu"), torch.float32, options))
    for batch, fid in ((1, 1.0), (2, 1.0), (1, 0.0)):
        runner(torch.zeros(batch, 3, 2, 2), torch.full((batch,), fid))
    assert fake_graphs["pools"] == [0] and [c[0] for c in fake_graphs["captures"]] == [0, 0, 0]
    assert len({id(c[1]) for c in fake_graphs["captures"]}) == 1 and fake_graphs["captures"][0][1].name == "side"
    per_key = ["side waits for current", "warm-up on side", "current waits for side"]
    assert fake_graphs["events"] == ["new stream"] + per_key * 3


def test_the_graph_input_is_laid_out_as_asked_and_the_callers_fidelity_is_not_the_static_buffer(fake_graphs):
    """The static input has the runner's layout (channels-last), so each replay's model sees NHWC; the static
    fidelity is a buffer of the runner's own: the next call's copy into it leaves the caller's tensor alone."""
    model = _Seen()
    options = FastOptions(compile=False, cuda_graphs=True, channels_last=True)
    runner = fake_graphs["recording"](FastRunner(model, "VQFRv2", torch.device("cpu"), torch.float32, options))
    first = torch.tensor([0.25])
    out1 = runner(torch.zeros(1, 3, 2, 2), first)
    out2 = runner(torch.zeros(1, 3, 2, 2), torch.tensor([0.75]))
    assert all(channels_last for _, channels_last, _ in model.calls)
    assert first.item() == 0.25
    assert out1.flatten()[0].item() == 0.25 and out2.flatten()[0].item() == 0.75
# ------------------------------------------------------------------------------------------------------ export.fp16
def _graph(nodes, inputs, outputs, initializers=(), opset=19):
    """An ONNX graph from ``onnx.helper`` nodes; inputs and outputs are names ([1, 4, 6, 6] fp32) or (name, type,
    shape)."""
    import onnx
    from onnx import TensorProto, helper

    def info(spec):
        name, kind, shape = spec if isinstance(spec, tuple) else (spec, TensorProto.FLOAT, (1, 4, 6, 6))
        return helper.make_tensor_value_info(name, kind, list(shape))

    graph = helper.make_graph(nodes, "g", [info(i) for i in inputs], [info(o) for o in outputs],
                              initializer=list(initializers))
    return ir.from_proto(onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])))


def _weight(name, shape):
    import onnx

    return onnx.numpy_helper.from_array(np.random.default_rng(0).random(shape, dtype=np.float32), name)


def _node(model, name):
    return next(n for n in model.graph if n.name == name)


def _dtypes(values):
    return [v.dtype for v in values if v is not None]


def _casts(model):
    return sorted((n.inputs[0].name, n.attributes["to"].as_int()) for n in model.graph if n.op_type == "Cast")


H, FL = (ir.DataType.FLOAT16, ir.DataType.FLOAT) if ir is not None else (None, None)


@needs_onnx
def test_mark_fp32_tags_the_nodes_between_the_inputs_and_the_outputs_only():
    from onnx import helper

    model = _graph([helper.make_node("Relu", ["x"], ["a"], name="before"),
                    helper.make_node("Sigmoid", ["a"], ["b"], name="inside1"),
                    helper.make_node("Mul", ["b", "a"], ["c"], name="inside2"),
                    helper.make_node("Relu", ["c"], ["y"], name="after")], ["x"], ["y"])
    a, c = _node(model, "before").outputs[0], _node(model, "inside2").outputs[0]
    fp16.mark_fp32("probe", [c, None], [a, None])
    tags = {n.name: n.metadata_props.get(fp16.FP32_KEY) for n in model.graph}
    assert tags == {"before": None, "inside1": "probe", "inside2": "probe", "after": None}


@needs_onnx
def test_the_last_conv_is_the_conv_that_writes_a_graph_output():
    """The Conv producing the output stays fp32 (fp32 weight, fp32 input cast once), the other Conv is fp16 with an
    fp16 weight copy; a graph ending in a Relu after its Conv has no last conv."""
    from onnx import helper

    convs = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="first"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w"], ["y"], pads=[1, 1, 1, 1], name="last")]
    model = _graph(convs, ["x"], ["y"], [_weight("w", (4, 4, 3, 3))])
    assert fp16.island_reasons(model) == {"last_conv": 1} and fp16.fp32_node_names(model) == {"last"}
    assert fp16.convert_to_fp16(model) == 3  # x -> fp16, w -> an fp16 copy, r -> fp32
    assert _dtypes(_node(model, "first").inputs) == [H, H] and _dtypes(_node(model, "last").inputs) == [FL, FL]
    assert _dtypes(_node(model, "last").outputs) == [FL] and _dtypes(model.graph.outputs) == [FL]
    assert _casts(model) == [("r", FL), ("x", H)]
    assert sorted(model.graph.initializers) == ["w", "w__fp16"]
    ending_in_relu = _graph([*convs[:2], helper.make_node("Relu", ["c"], ["y"], name="out")], ["x"], ["y", "r"],
                            [_weight("w", (4, 4, 3, 3))])
    assert fp16.island_reasons(ending_in_relu) == {} and fp16.fp32_node_names(ending_in_relu) == set()


@needs_onnx
def test_every_softmax_argmin_argmax_and_norm_is_an_fp32_island_and_integers_stay_integers():
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Softmax", ["r"], ["s"], axis=1, name="softmax"),
             helper.make_node("LayerNormalization", ["s", "g"], ["ln"], axis=-1, name="ln"),
             helper.make_node("ArgMin", ["ln"], ["i"], axis=1, name="argmin"),
             helper.make_node("ArgMax", ["ln"], ["j"], axis=1, name="argmax"),
             helper.make_node("Relu", ["ln"], ["y"], name="out")]
    index = ("i", TensorProto.INT64, (1, 1, 6, 6))
    model = _graph(nodes, ["x"], ["y", index, ("j", TensorProto.INT64, (1, 1, 6, 6))], [_weight("g", (6,))])
    assert fp16.island_reasons(model) == {"Softmax": 1, "LayerNormalization": 1, "ArgMin": 1, "ArgMax": 1}
    fp16.convert_to_fp16(model)
    for name in ("softmax", "ln", "argmin", "argmax"):
        assert set(_dtypes(_node(model, name).inputs)) == {FL}, name
    assert _dtypes(_node(model, "relu").outputs) == [H] and _dtypes(_node(model, "softmax").outputs) == [FL]
    assert _dtypes(_node(model, "argmin").outputs) == _dtypes(_node(model, "argmax").outputs) == [ir.DataType.INT64]
    assert _dtypes(model.graph.outputs) == [FL, ir.DataType.INT64, ir.DataType.INT64]


@needs_onnx
def test_a_tensor_is_cast_once_per_direction_shapes_are_read_uncast_and_resize_scales_stay_fp32():
    """Two fp32 readers of one fp16 tensor share one Cast; ``Shape`` reads the fp32 input as it is; Resize's
    ``scales`` input is fp32 by the ONNX spec, whatever the data's dtype; outputs keep their names and fp32."""
    import onnx
    from onnx import TensorProto, helper

    scales = onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales")
    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Softmax", ["r"], ["s1"], axis=1, name="softmax1"),
             helper.make_node("Softmax", ["r"], ["s2"], axis=2, name="softmax2"),
             helper.make_node("Add", ["s1", "s2"], ["sum"], name="add"),
             helper.make_node("Resize", ["sum", "", "scales"], ["y"], mode="nearest", name="resize")]
    model = _graph(nodes, ["x"], [("y", TensorProto.FLOAT, (1, 4, 12, 12)), ("shape", TensorProto.INT64, (4,))],
                   [scales])
    count = fp16.convert_to_fp16(model)
    assert _node(model, "shape").inputs[0].name == "x"  # no Cast in front of Shape
    assert _casts(model) == [("r", FL), ("s1", H), ("s2", H), ("x", H), ("y__fp16", FL)]
    assert count == 5
    assert _node(model, "softmax1").inputs[0] is _node(model, "softmax2").inputs[0]
    resize = _node(model, "resize")
    assert _dtypes(resize.inputs) == [H, FL] and resize.inputs[2].name == "scales"
    assert [v.name for v in model.graph.outputs] == ["y", "shape"] and _dtypes(model.graph.outputs)[0] == FL


@needs_onnx
def test_casts_and_constants_keep_their_own_type_and_unnamed_nodes_are_not_listed_for_tensorrt():
    """A Cast in the graph keeps the dtype its ``to`` names (an int cast to fp32 is then cast to fp16 for an fp16
    reader), as does a ``Constant``; ``fp32_node_names`` lists named nodes only; an initializer that is itself a
    graph output survives the clean-up."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT, name="cast_in"),
             helper.make_node("Constant", [], ["k"], value=helper.make_tensor("kv", TensorProto.FLOAT, [1], [0.5]),
                              name="const"),
             helper.make_node("Mul", ["nf", "k"], ["m"], name="mul"),
             helper.make_node("Softmax", ["m"], ["s"], axis=1),
             helper.make_node("Softmax", ["m"], ["t"], axis=2, name="named"),
             helper.make_node("Add", ["s", "t"], ["y"], name="add")]
    model = _graph(nodes, [("n", TensorProto.INT64, (1, 4, 6, 6))], ["y", ("w", TensorProto.FLOAT, (4,))],
                   [_weight("w", (4,))])
    assert fp16.fp32_node_names(model) == {"named"}
    fp16.convert_to_fp16(model)
    assert _dtypes(_node(model, "cast_in").outputs) == [FL]
    mul = _node(model, "mul")
    assert _dtypes(mul.inputs) == [H, H]
    assert _casts(model) == [("k", H), ("m", FL), ("n", FL), ("nf", H), ("s", H), ("t", H), ("y__fp16", FL)]
    assert [v.name for v in model.graph.outputs] == ["y", "w"] and "w" in model.graph.initializers


@needs_onnx
def test_island_reasons_count_one_anchor_per_tagged_island():
    """A GroupNorm's translation tags several nodes (Reshape, InstanceNormalization, Mul, Add): the island counts
    once, on its InstanceNormalization; an untagged Conv that is not the last one is no island."""
    from onnx import helper

    nodes = [helper.make_node("InstanceNormalization", ["x", "s", "b"], ["n"], name="norm"),
             helper.make_node("Mul", ["n", "x"], ["m"], name="mul"),
             helper.make_node("Add", ["m", "x"], ["a"], name="add"),
             helper.make_node("Conv", ["a", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    model = _graph(nodes, ["x"], ["y"], [_weight("s", (4,)), _weight("b", (4,)), _weight("w", (4, 4, 3, 3))])
    for name in ("norm", "mul", "add"):
        _node(model, name).metadata_props[fp16.FP32_KEY] = "group_norm"
    assert fp16.island_reasons(model) == {"group_norm": 1}


def _dcn_model(fp16_graph: bool = True):
    """x -> Relu -> DeformConv (tagged) -> Relu -> y, its offset cast from an int64 input, the Relu's output also
    read by a Softmax (fp32); converted to fp16 when asked."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Cast", ["off_i"], ["off"], to=TensorProto.FLOAT, name="cast_offset"),
             helper.make_node("DeformConv", ["r", "w", "off", "b", "mask"], ["d"], pads=[1, 1, 1, 1],
                              kernel_shape=[3, 3], name="dcn"),
             helper.make_node("Softmax", ["r"], ["s"], axis=1, name="softmax"),
             helper.make_node("Add", ["d", "s"], ["y"], name="add")]
    model = _graph(nodes, ["x", ("off_i", TensorProto.INT64, (1, 18, 6, 6)), ("mask", TensorProto.FLOAT, (1, 9, 6, 6))],
                   ["y"], [_weight("w", (4, 4, 3, 3)), _weight("b", (4,))])
    _node(model, "dcn").metadata_props[fp16.FP32_KEY] = "deform_conv"
    if fp16_graph:
        fp16.convert_to_fp16(model)
    return model


@needs_onnx
def test_the_deform_conv_is_an_fp32_island_unless_dcn_fp16_is_asked_for():
    model = _dcn_model()
    dcn = _node(model, "dcn")
    assert set(_dtypes(dcn.inputs)) == {FL} and _dtypes(dcn.outputs) == [FL]
    assert fp16.island_reasons(model) == {"deform_conv": 1, "Softmax": 1}
    half = _dcn_model(fp16_graph=False)
    fp16.convert_to_fp16(half, dcn_fp16=True)
    dcn = _node(half, "dcn")
    assert set(_dtypes(dcn.inputs)) == {H} and _dtypes(dcn.outputs) == [H]
    assert sorted(half.graph.initializers) == ["b__fp16", "w__fp16"]  # the fp32 originals are dropped


@needs_onnx
def test_dcn_to_fp16_bypasses_the_casts_around_each_deform_conv_once():
    """The Cast in front of the DeformConv is bypassed (kept while the Softmax still reads it), the int offset's
    fp32 Cast gets an fp16 Cast (an int tensor never reaches the DeformConv), the weights get fp16 copies, the fp16
    output feeds its reader directly, the tag is removed; a second call finds nothing to move."""
    model = _dcn_model()
    assert fp16.dcn_to_fp16(model) == 1
    dcn = _node(model, "dcn")
    assert _dtypes(dcn.inputs) == [H] * 5 and _dtypes(dcn.outputs) == [H]
    assert dcn.inputs[0] is _node(model, "relu").outputs[0]
    assert [v.name for v in dcn.inputs[1:]] == ["w__fp16", "off__fp16", "b__fp16", "mask__fp16"]
    assert fp16.FP32_KEY not in dcn.metadata_props
    assert _node(model, "add").inputs[0] is dcn.outputs[0]
    assert _casts(model) == [("mask", H), ("off", H), ("off_i", FL), ("r", FL), ("s", H), ("x", H), ("y__fp16", FL)]
    assert sorted(model.graph.initializers) == ["b__fp16", "w__fp16"]
    casts = _casts(model)
    assert fp16.dcn_to_fp16(model) == 0 and _casts(model) == casts


@needs_onnx
def test_dcn_to_fp16_drops_the_cast_in_front_when_nothing_else_reads_it():
    model = _dcn_model(fp16_graph=False)
    softmax = _node(model, "softmax")
    softmax.replace_input_with(0, model.graph.inputs[0])  # the Softmax now reads x, not the Relu
    fp16.convert_to_fp16(model)
    assert ("r", FL) in _casts(model)
    fp16.dcn_to_fp16(model)
    assert ("r", FL) not in _casts(model)
# ------------------------------------------------------------------------------------------------- kernels.aot_check
class _Param:
    def __init__(self, constexpr):
        self.is_constexpr = constexpr


class _Fn:
    __name__ = "kernel"

    def __init__(self, names, constexprs=()):
        self.arg_names = names
        self.params = [_Param(n in constexprs) for n in names]


def test_the_signature_specialises_as_tritons_jit_does():
    """Pointers typed by their tensor's dtype and 16-aligned; ints equal to 1 become the constant 1; other ints are
    i32 in [-2**31, 2**31) (16-divisible ones flagged so), i64 outside; bools are i1; constexprs are constants from
    the launch's constexprs when not passed."""
    from kernels import aot_check

    names = ["x", "idx", "n", "one", "top", "low", "below", "odd", "flag", "eight", "BLOCK"]
    args = [torch.empty(4, device="meta", dtype=torch.float16), torch.empty(4, device="meta", dtype=torch.int64),
            4096, 1, 2**31, -(2**31), -(2**31) - 1, 2**31 - 1, True, 24]
    signature, constants, attrs = aot_check._signature(_Fn(names, {"BLOCK"}), args, {"BLOCK": 64})
    assert signature == {"x": "*fp16", "idx": "*i64", "n": "i32", "one": "constexpr", "top": "i64", "low": "i32",
                         "below": "i64", "odd": "i32", "flag": "i1", "eight": "i32", "BLOCK": "constexpr"}
    assert constants == {(3,): 1, (10,): 64}
    div16 = [["tt.divisibility", 16]]
    assert attrs == {(0,): div16, (1,): div16, (2,): div16, (4,): div16, (5,): div16}  # not 24: 8-divisible only


def test_resource_usage_reads_registers_and_spills_and_refuses_output_without_them(monkeypatch):
    from kernels import aot_check

    seen = []

    def run(cmd, **kwargs):
        seen.append(cmd)
        return types.SimpleNamespace(stdout=text)

    monkeypatch.setattr(aot_check.subprocess, "run", run)
    text = "Function k:\n REG:40 STACK:8 SHARED:0 LOCAL:0"
    assert aot_check._resource_usage(b"cubin", "/bin/cuobjdump") == (40, 8)
    assert seen[0][:2] == ["/bin/cuobjdump", "-res-usage"]
    text = "cuobjdump info    : File 'kernel.cubin' does not contain device code"
    with pytest.raises(RuntimeError, match="no REG/STACK"):
        aot_check._resource_usage(b"cubin", "/bin/cuobjdump")


@pytest.fixture
def stub_compiler(monkeypatch):
    """``triton.compile`` and cuobjdump replaced: each compile reports ``shared`` bytes and ``registers``."""
    import triton

    from kernels import aot_check

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    state = {"shared": 0, "registers": 32, "fail": lambda config: False, "compiled": []}

    def compile(src, target=None, options=None):
        state["compiled"].append((src.fn.__name__, target.arch, options["num_warps"]))
        if state["fail"](options):
            raise ValueError("first line\nout of resources: shared memory")
        return types.SimpleNamespace(asm={"cubin": b""}, metadata=types.SimpleNamespace(shared=state["shared"]))

    monkeypatch.setattr(triton, "compile", compile)
    monkeypatch.setattr(aot_check, "_resource_usage", lambda cubin, tool: (state["registers"], 0))
    return state


@needs_triton
def test_check_reports_blocks_per_sm_from_registers_and_shared_memory(stub_compiler):
    """blocks/SM = min(registers per SM // (registers x 32 x warps), shared memory per SM // shared bytes, or 32
    without shared memory); a config using exactly the SM's shared memory fits; each capability uses its own limits
    (sm_80: 164 KiB)."""
    from kernels import aot_check

    stub_compiler.update(shared=233472, registers=40)
    (row,) = aot_check.check(90, [torch.float16], only="nearest_code", max_configs=1)
    assert row["ok"] is True and row["blocks_per_sm"] == min(65536 // (40 * 32 * row["num_warps"]), 1)
    stub_compiler.update(shared=10000, registers=100)
    (row,) = aot_check.check(90, [torch.float16], only="nearest_code", max_configs=1)
    assert row["blocks_per_sm"] == min(65536 // (100 * 32 * row["num_warps"]), 233472 // 10000)
    stub_compiler.update(shared=0, registers=32)  # no shared memory: registers alone limit the blocks
    (row,) = aot_check.check(90, [torch.float16], only="nearest_code", max_configs=1)
    assert row["ok"] is True and row["blocks_per_sm"] == min(65536 // (32 * 32 * row["num_warps"]), 32)
    stub_compiler.update(shared=167937, registers=8)
    (row,) = aot_check.check(80, [torch.float16], only="nearest_code", max_configs=1)
    assert row["ok"] is False  # one byte over the A100's 167936
    assert {c[1] for c in stub_compiler["compiled"]} == {90, 80}


@needs_triton
def test_check_compiles_the_kernels_named_and_the_pruned_configs_asked_for(stub_compiler):
    """``only`` is a substring of the kernel names; ``max_configs`` caps the configs left by the kernel's own
    pruning (fp32 keeps the code search's fp32 tiles only); a failing compile is a row with ok False."""
    from kernels import aot_check, dispatch

    nearest = dispatch.triton_module("nearest_code_triton")
    rows = aot_check.check(90, [torch.float32], only="group_norm", max_configs=1)
    assert [r["kernel"] for r in rows] == ["group_norm stats, channels-last", "group_norm apply, channels-last",
                                           "group_norm stats, NCHW", "group_norm apply, NCHW"]
    rows = aot_check.check(90, [torch.float32], only="nearest_code", max_configs=None)
    configs = {str(c.kwargs) for c in nearest.FP32_CONFIGS}
    assert rows and len(rows) <= len(nearest.FP32_CONFIGS) and all(r["config"] in configs for r in rows)
    every = aot_check.check(90, [torch.float16], only="deform_conv forward, 256", max_configs=None)
    assert len(every) > 2 and len(aot_check.check(90, [torch.float16], only="deform_conv forward, 256",
                                                 max_configs=2)) == 2
    stub_compiler["fail"] = lambda options: True
    (row,) = aot_check.check(90, [torch.float16], only="nearest_code", max_configs=1)
    assert row["ok"] is False and row["error"] == "ValueError: out of resources: shared memory"


@needs_triton
def test_check_refuses_the_interpreter(monkeypatch):
    from kernels import aot_check

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot_check.check(90, [torch.float16], max_configs=1)


def test_aot_check_cli_passes_its_flags_and_checks_fp16_and_fp32_by_default(monkeypatch, capsys):
    from kernels import aot_check

    calls = []
    row = dict(kernel="k", dtype="fp16", config="{}", num_warps=4, num_stages=2, registers=32, spill_bytes=0,
               shared_bytes=0, blocks_per_sm=8, ok=True)
    monkeypatch.setattr(aot_check, "check", lambda *args: calls.append(args) or [row])
    assert aot_check.main([]) == 0
    assert aot_check.main(["--capability", "80", "--dtypes", "bf16", "--only", "nearest"]) == 0
    assert calls == [(90, [torch.float16, torch.float32], ""), (80, [torch.bfloat16], "nearest")]
    capsys.readouterr()


def test_the_group_norm_launches_cover_both_layouts():
    """The apply kernel is checked on channels-last input (the model's layout) and on NCHW: different strides."""
    from kernels import aot_check

    launches = dict(aot_check.vqfr_launches(torch.float16))
    strides = {name: next(a for a in launch.args if isinstance(a, torch.Tensor) and a.numel() == 128 * 512 * 512)
               .stride()[1:] for name, launch in launches.items() if name.startswith("group_norm apply")}
    assert strides == {"group_norm apply, NCHW": (512 * 512, 1), "group_norm apply, channels-last": (1, 128)}

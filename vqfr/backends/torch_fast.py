"""The fast path of the torch backend: ``TorchBackend(..., mode="max")`` (or ``$VQFR_TORCH_MODE=max``).

It stacks, on one GPU:

1. **Reduced precision with fp32 islands** (:func:`with_fp32_islands`): weights and activations in fp16 (or bf16),
   except the modules of :data:`FP32_ISLANDS`: every GroupNorm and LayerNorm (their statistics overflow or lose
   precision in fp16: GFPGAN#483), the attention blocks (scores and softmax), the code selection (v2's ``feat2index``
   logits stay fp32 for the argmax; v1's quantizer searches in fp32) and the last convolution, which writes the
   image. Islands take their input in the caller's precision, compute in fp32 and hand back the caller's dtype.
   The plain torch backend uses the same islands for fp16/bf16.
2. **Our Triton kernels** for the deformable convolution and the nearest-code search (``kernels``; automatic on
   CUDA).
3. **The v2 fidelity-0 shortcut**: a batch whose fidelities are all 0 runs the texture branch only (its own graph).
4. **channels_last** activations and weights: cuDNN's fp16 tensor-core convolutions are NHWC-native, and the Triton
   deformable conv reads channels-last without a conversion.
5. **torch.compile** with ``fullgraph=True`` and static shapes: one graph per (batch size, fidelity kind). Inductor
   fuses each fp32 GroupNorm into a statistics reduction plus one pointwise pass that normalises, applies the
   affine, the SiLU and the cast back to fp16, so a GroupNorm+SiLU costs one read for the statistics and one
   read + write; it fuses the other elementwise work into neighbouring kernels too.
6. **CUDA graphs**: each (batch, fidelity kind) is captured once after warm-up (which also runs Triton's autotuning
   and the compilation) and replayed, so batch 1 pays no per-kernel launch overhead. The graphs share one memory
   pool; each replay's output is copied out before the next replay can reuse it. After each capture the cached
   blocks of the warm-up are released (``torch.cuda.empty_cache``): they would otherwise keep a second copy of the
   peak activations reserved in the default pool, which replays never use.

Opt-in, off by default because it has not been measured on a GPU yet: ``FastOptions(fused_group_norm=True)``
(``deploy.bench --backends torch-max-gn``) replaces every GroupNorm by :class:`FusedGroupNorm`, which calls
``kernels.group_norm_silu`` (Triton on CUDA: statistics and normalisation in fp32, whole pixel rows read, the output
in the caller's dtype; its weight and bias stay fp32). It takes the place of the GroupNorms' fp32 islands, and the
SiLU that follows a GroupNorm is fused into it: in ``nn.Sequential`` (GN, SiLU) pairs, whose SiLU becomes
``nn.Identity``, and in the norms that ``ResnetBlock`` feeds into a SiLU (``silu_norms``). The attention blocks'
norm gets no SiLU. The replaced model keeps its state-dict keys (see :func:`with_fused_group_norm`).

Each step can be switched off through :class:`FastOptions`; on a CPU the defaults reduce to steps 1-4 (no compile,
no graphs), which is how the tests run this code. On CUDA the mode also turns on ``torch.backends.cudnn.benchmark``
(static shapes). Each (batch, fidelity kind) compiles a function with a code object of its own, so torch's recompile
limit (counted per code object) never comes into play, however many keys and runners a process has.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

import kernels
from vqfr.models.blocks import AttnBlock
from vqfr.models.quantizer import L2VectorQuantizerKmeans

__all__ = ["FastOptions", "Float32Island", "FP32_ISLANDS", "with_fp32_islands", "FastRunner", "island_names",
           "FusedGroupNorm", "with_fused_group_norm"]


@dataclasses.dataclass(frozen=True)
class FastOptions:
    """What ``mode="max"`` does (None: the default for the device: on for CUDA, off for the CPU).

    Attributes:
        compile: torch.compile the model (``fullgraph=True``, static shapes).
        compile_mode: torch.compile's ``mode`` (None: Inductor's default; ``"max-autotune-no-cudagraphs"`` also
            benchmarks GEMM/conv choices, which takes minutes more per shape). Modes in which Inductor captures CUDA
            graphs itself (``"reduce-overhead"``, ``"max-autotune"``) are refused while ``cuda_graphs`` is on.
        compile_backend: torch.compile's ``backend`` (``"inductor"``; ``"aot_eager"`` checks the tracing alone).
        cuda_graphs: capture and replay a CUDA graph per (batch, fidelity kind).
        channels_last: run convolutions and the deformable conv in NHWC.
        fp32_islands: keep :data:`FP32_ISLANDS` in fp32 when the precision is fp16/bf16.
        fused_group_norm: replace each GroupNorm (and the SiLU after it) by :class:`FusedGroupNorm`
            (:func:`with_fused_group_norm`). Off by default: not yet measured on a GPU.
    """

    compile: bool | None = None
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    cuda_graphs: bool | None = None
    channels_last: bool = True
    fp32_islands: bool = True
    fused_group_norm: bool = False

    def resolved(self, device: torch.device) -> FastOptions:
        """These options with the None fields set for ``device``.

        Raises:
            ConfigError: ``compile_mode`` is not one of torch.compile's, or makes Inductor capture CUDA graphs while
                ours are on.
        """
        cuda = device.type == "cuda"
        options = dataclasses.replace(
            self, compile=cuda if self.compile is None else self.compile,
            cuda_graphs=cuda if self.cuda_graphs is None else (self.cuda_graphs and cuda))
        if options.compile and options.compile_mode is not None:
            _check_compile_mode(options.compile_mode, bool(options.cuda_graphs))
        return options


def _check_compile_mode(mode: str, cuda_graphs: bool) -> None:
    """Refuse a torch.compile ``mode`` that torch does not know, or that turns on Inductor's own CUDA graphs
    (``triton.cudagraphs``) while :class:`FastRunner` captures its own: Inductor would capture and replay its graphs
    inside our capture, each with its own memory pool."""
    from torch._inductor import list_mode_options

    from vqfr.errors import ConfigError

    modes = list_mode_options()
    if mode not in modes:
        raise ConfigError(f"unknown compile_mode {mode!r}",
                          fix=f"use one of torch.compile's modes: {', '.join(modes)} (e.g. max-autotune-no-cudagraphs)")
    if cuda_graphs and modes[mode].get("triton.cudagraphs"):
        raise ConfigError(f"compile_mode {mode!r} makes torch capture CUDA graphs itself, inside the max mode's own "
                          "CUDA-graph capture",
                          fix="use compile_mode='max-autotune-no-cudagraphs' (or None), or turn our capture off with "
                              "FastOptions(cuda_graphs=False)")


def _floating(t: Any) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point()


class Float32Island(nn.Module):
    """Runs ``inner`` (kept in fp32) on fp32 copies of its floating-point inputs.

    Args:
        inner: the module; it is converted to fp32 in place.
        cast_back: return floating-point outputs (tensors, or tensors inside tuples and named tuples) in the dtype
            of the first floating-point input; False returns them in fp32 (v2's code logits, whose argmax must not
            see fp16 ties).
    """

    def __init__(self, inner: nn.Module, cast_back: bool = True):
        super().__init__()
        self.inner = inner.float()
        self.cast_back = cast_back

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        leaves = [a for a in pytree.tree_leaves((args, kwargs)) if _floating(a)]
        dtype = leaves[0].dtype if leaves else torch.float32
        args, kwargs = pytree.tree_map(lambda a: a.float() if _floating(a) else a, (args, kwargs))
        out = self.inner(*args, **kwargs)
        if not self.cast_back or dtype == torch.float32:
            return out
        return pytree.tree_map(lambda a: a.to(dtype) if _floating(a) else a, out)


def _last_conv(arch: str) -> str | None:
    return {"VQFRv1": "main_decoder.conv_out.0", "VQFRv2": "decoder.conv_out.2"}.get(arch)


#: (what, predicate(qualified name, module, arch), cast_back): the modules kept in fp32 in reduced precision.
FP32_ISLANDS: tuple[tuple[str, Callable[[str, nn.Module, str], bool], bool], ...] = (
    ("GroupNorm / LayerNorm", lambda name, m, arch: isinstance(m, (nn.GroupNorm, nn.LayerNorm)), True),
    ("attention block", lambda name, m, arch: isinstance(m, AttnBlock), True),
    ("v1 quantizer (nearest-code search)", lambda name, m, arch: isinstance(m, L2VectorQuantizerKmeans), True),
    ("v2 code prediction (feat2index)", lambda name, m, arch: name == "feat2index", False),
    ("last convolution", lambda name, m, arch: name == _last_conv(arch), True),
)


def with_fp32_islands(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` in ``dtype`` with the modules of :data:`FP32_ISLANDS` wrapped in :class:`Float32Island`.

    In fp32 the copy is plain. The input model is never modified. :class:`FusedGroupNorm` modules (which compute in
    fp32 themselves) are not GroupNorms and stay unwrapped; their weight and bias stay fp32, as an island's would.
    """
    model = copy.deepcopy(model).to(dtype)
    if dtype == torch.float32:
        return model
    for module in model.modules():
        if isinstance(module, FusedGroupNorm):
            module.float()
    arch = (getattr(model, "options", None) or {}).get("type", getattr(model, "arch", ""))
    for name, module in list(model.named_modules()):
        if not name or any(part == "inner" for part in name.split(".")):
            continue
        for _, predicate, cast_back in FP32_ISLANDS:
            if predicate(name, module, arch):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                if not isinstance(parent, Float32Island):
                    setattr(parent, child, Float32Island(module, cast_back))
                break
    return model


class FusedGroupNorm(nn.Module):
    """A GroupNorm, optionally followed by SiLU, through ``kernels.group_norm_silu``: statistics and normalisation in
    fp32 whatever the input's dtype, output in the input's dtype and memory format (an fp32 island of its own).

    It takes over the ``weight`` and ``bias`` parameters of ``norm``, so its state-dict keys are the GroupNorm's.

    Args:
        norm: the GroupNorm replaced.
        silu: also apply the SiLU that follows it (``applies_silu``: :func:`vqfr.models.blocks.norm_silu` then skips
            its own).

    Shapes: [N, C, H, W] -> [N, C, H, W].
    """

    def __init__(self, norm: nn.GroupNorm, silu: bool):
        super().__init__()
        self.num_groups, self.num_channels, self.eps = norm.num_groups, norm.num_channels, norm.eps
        self.weight, self.bias = norm.weight, norm.bias  # Parameters (or None without affine)
        self.applies_silu = silu

    def forward(self, x: Tensor) -> Tensor:
        return kernels.group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, silu=self.applies_silu)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, silu={self.applies_silu}"


def with_fused_group_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose GroupNorms are :class:`FusedGroupNorm` modules; the input model is not modified.

    The SiLU is fused where a GroupNorm feeds one directly: a (GroupNorm, ``nn.SiLU``) pair inside an
    ``nn.Sequential`` (the SiLU becomes ``nn.Identity``, which has no keys and keeps the indices) and the norms a
    module lists in ``silu_norms`` (``ResnetBlock``'s, applied through ``norm_silu``). Other GroupNorms (the attention
    blocks') get no SiLU. State-dict keys are unchanged.
    """
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                norm, act = module[i], module[i + 1]
                if isinstance(norm, nn.GroupNorm) and isinstance(act, nn.SiLU):
                    module[i] = FusedGroupNorm(norm, silu=True)
                    module[i + 1] = nn.Identity()
        for name in getattr(module, "silu_norms", ()):
            child = getattr(module, name)
            if isinstance(child, nn.GroupNorm):
                setattr(module, name, FusedGroupNorm(child, silu=True))
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.GroupNorm):
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child_name,
                    FusedGroupNorm(module, silu=False))
    return model


def island_names(model: nn.Module) -> list[str]:
    """Qualified names of the fp32 islands of a model made by :func:`with_fp32_islands`."""
    return [name for name, m in model.named_modules() if isinstance(m, Float32Island)]


def _with_inductor_layouts_fixed(fn: Callable) -> Callable:
    """``fn`` compiling without Inductor's layout optimisation when the kernels are opaque custom ops (no Triton).

    That optimisation re-lays conv activations channels-last after tracing, and an opaque deformable conv then
    receives an input (and returns an output) in another layout than the one its fake kernel was traced with. With
    Triton on CUDA the ops are ``triton_op``s, which Inductor traces into, and nothing is changed.
    """
    from kernels import ops

    if ops.TRITON_OPS:
        return fn

    def call(*args: Any) -> Any:
        with torch._inductor.config.patch(layout_optimization=False):
            return fn(*args)

    return call


def _own_code(fn: Callable, name: str) -> Callable:
    """``fn`` (a plain function or lambda) with a fresh code object named ``name``.

    Dynamo keeps its compiled graphs per code object and counts them against ``recompile_limit`` (8 by default;
    with ``fullgraph=True`` the next one raises). The lambdas of :meth:`FastRunner._forward` share one code object
    across batch sizes and runners, so the (batch, fidelity kind) keys of every runner in the process added up
    towards that limit; with a code object of its own, each compiled function holds the one graph of its static
    shapes, and the global limit stays as the user set it. The name shows in Dynamo's logs.
    """
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


@dataclasses.dataclass
class _Graph:
    """A captured CUDA graph and its static input and output buffers."""

    graph: Any
    x: Tensor
    fidelity: Tensor | None
    out: Tensor


class FastRunner:
    """Runs a prepared model on batches with static shapes: compiled per (batch, fidelity kind), replayed from CUDA
    graphs when enabled.

    Args:
        model: the model (already in its precision, on ``device``, eval mode).
        arch: ``VQFRv1`` or ``VQFRv2``.
        device: where it runs.
        dtype: the model's activation dtype.
        options: resolved :class:`FastOptions`.
    """

    def __init__(self, model: nn.Module, arch: str, device: torch.device, dtype: torch.dtype, options: FastOptions):
        self.model, self.arch, self.device, self.dtype, self.options = model, arch, device, dtype, options
        self.memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # static shapes: let cuDNN pick each convolution's algorithm once
        self._compiled: dict[tuple[int, bool], Callable] = {}
        self._graphs: dict[tuple[int, bool], _Graph] = {}
        self._pool: Any = None  # one CUDA-graph memory pool that every captured graph shares
        self._stream: Any = None  # the side stream of every warm-up and capture (see _capture)
        #: seconds spent preparing each (batch, texture_only) key: compilation, autotuning, capture
        self.prepare_s: dict[tuple[int, bool], float] = {}

    def _forward(self, texture_only: bool) -> Callable[[Tensor, Tensor | None], Tensor]:
        model = self.model
        if self.arch != "VQFRv2":
            return lambda x, f: model(x)
        if texture_only:
            return lambda x, f: model(x, fidelity=0.0)
        return lambda x, f: model(x, fidelity=f)

    def _function(self, key: tuple[int, bool]) -> Callable[[Tensor, Tensor | None], Tensor]:
        fn = self._compiled.get(key)
        if fn is None:
            fn = self._forward(key[1])
            if self.options.compile:
                kind = "texture" if key[1] else "full"
                fn = _with_inductor_layouts_fixed(torch.compile(
                    _own_code(fn, f"vqfr_{self.arch}_b{key[0]}_{kind}"), fullgraph=True, dynamic=False,
                    mode=self.options.compile_mode, backend=self.options.compile_backend))
            self._compiled[key] = fn
        return fn

    def _capture(self, key: tuple[int, bool], x: Tensor, fidelity: Tensor | None) -> _Graph:
        """Warm up on a side stream (compiles and autotunes), then capture one forward into a CUDA graph."""
        fn = self._function(key)
        static_x = x.clone(memory_format=self.memory_format)
        static_f = None if fidelity is None else fidelity.clone()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            # One side stream on this runner's device for every warm-up and capture that shares the pool: without
            # stream=, torch.cuda.graph captures on a stream made once on whichever device was current first, and a
            # model on another GPU would then be captured empty (every replay doing nothing).
            self._stream = torch.cuda.Stream(self.device)
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn(static_x, static_f)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=stream):
            out = fn(static_x, static_f)
        return _Graph(graph, static_x, static_f, out)

    @torch.inference_mode()
    def __call__(self, x: Tensor, fidelity: Tensor) -> Tensor:
        """x [B,3,S,S] float (any device), fidelity [B] float32 (CPU) -> [B,3,S,S] in the model's dtype."""
        texture_only = self.arch == "VQFRv2" and bool((fidelity == 0).all())
        key = (int(x.shape[0]), texture_only)
        x = x.to(device=self.device, dtype=self.dtype).contiguous(memory_format=self.memory_format)
        f = None if self.arch != "VQFRv2" or texture_only else fidelity.to(self.device, torch.float32)
        if not self.options.cuda_graphs:
            start = time.perf_counter()
            out = self._function(key)(x, f)
            self.prepare_s.setdefault(key, time.perf_counter() - start)
            return out
        graph = self._graphs.get(key)
        if graph is None:
            start = time.perf_counter()
            graph = self._graphs[key] = self._capture(key, x, f)
            torch.cuda.synchronize(self.device)
            # The warm-up ran outside the graphs' pool: its activations, now free, stay cached in the default pool,
            # which replays never use. Hand them back, so that the process holds the weights and the graph pool
            # rather than a second copy of the peak activations.
            torch.cuda.empty_cache()
            self.prepare_s[key] = time.perf_counter() - start
        graph.x.copy_(x)
        if f is not None and graph.fidelity is not None:
            graph.fidelity.copy_(f)
        graph.graph.replay()
        # The next replay of any graph may reuse this memory (shared pool): hand out a copy.
        return graph.out.clone()

    def close(self) -> None:
        self._graphs.clear()
        self._compiled.clear()
        self.model = None  # type: ignore[assignment]

"""The Triton kernels compile for an H100 (sm_90) without a GPU: what the CPU interpreter cannot show.

Each kernel is compiled from the launch its launcher would make at VQFR's largest shapes, with Triton's compiler
and the ptxas that ships with triton; the full sweep over every config is ``python -m kernels.aot_check``.
"""

from pathlib import Path

import pytest
import torch

from kernels import dispatch

pytestmark = pytest.mark.skipif(not dispatch.triton_installed(), reason="triton is not installed")


def test_every_kernel_compiles_for_sm90_without_spills(monkeypatch):
    from kernels import aot_check

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    results = aot_check.check(90, [torch.float16], max_configs=1)
    assert {r["kernel"] for r in results} == {
        "deform_conv forward", "deform_conv forward, 256 channels", "deform_conv backward (x, offset, mask)",
        "deform_conv backward (weight)", "nearest_code", "group_norm stats, channels-last",
        "group_norm apply, channels-last", "group_norm stats, NCHW", "group_norm apply, NCHW",
    }
    for r in results:
        assert r.get("ok"), f"{r['kernel']} {r['config']}: {r.get('error')}"
        assert r["spill_bytes"] == 0, r


def test_nearest_code_with_a_float64_codebook_compiles(monkeypatch):
    """fp32 tokens against a float64 codebook reached the kernel (the dispatch looked at the tokens' dtype only; it
    now sends a float64 codebook to the reference, but the launcher is public). Promoted to float64, the kernel's
    tl.dot did not compile for its fp32 accumulators; the launcher stops at fp32, which is what the reference computes
    in."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import aot_check

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    nearest = dispatch.triton_module("nearest_code_triton")
    _, launch = nearest.nearest_code_launch(torch.empty(256, 256, device="meta"),
                                            torch.empty(1024, 256, device="meta", dtype=torch.float64))
    assert launch.args[0].dtype == launch.args[1].dtype == torch.float32
    tuner = launch.kernel
    config = tuner.early_config_prune(tuner.configs, dict(zip(tuner.arg_names, launch.args, strict=False)),
                                      **launch.constexprs)[0]
    signature, constants, attrs = aot_check._signature(tuner.fn, launch.args, {**launch.constexprs, **config.kwargs})
    triton.compile(ASTSource(tuner.fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


@pytest.mark.parametrize("output_mask", [(False, True, True, False), (True, False, False, False),
                                         (False, False, True, False)])
def test_backward_input_kernel_compiles_without_the_gradients_not_asked_for(output_mask, monkeypatch):
    """The input-gradient kernel drops its grad_x atomics, or its reads of x, behind constexpr flags when autograd
    needs only some gradients (the interpreter cannot show that these variants compile); the weight kernel is not
    launched when the weight needs no gradient."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import aot_check

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    deform = dispatch.triton_module("deform_conv_triton")
    meta: dict = dict(device="meta", dtype=torch.float16)
    x, offset, mask = (torch.empty(1, c, 128, 128, **meta) for c in (128, 72, 36))
    conv = ((1, 1), (1, 1), (1, 1))
    _, launches = deform.backward_launches(torch.empty(1, 128, 128, 128, **meta), x, offset, mask,
                                           torch.empty(128, 128, 3, 3, **meta), *conv, output_mask)
    assert len(launches) == 1
    tuner = launches[0].kernel
    config = tuner.early_config_prune(tuner.configs, dict(zip(tuner.arg_names, launches[0].args, strict=False)),
                                      **launches[0].constexprs)[0]
    signature, constants, attrs = aot_check._signature(tuner.fn, launches[0].args,
                                                       {**launches[0].constexprs, **config.kwargs})
    compiled = triton.compile(ASTSource(tuner.fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    cuobjdump = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    _, spill_bytes = aot_check._resource_usage(compiled.asm["cubin"], cuobjdump)
    assert spill_bytes == 0

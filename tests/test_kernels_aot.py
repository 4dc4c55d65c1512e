"""The Triton kernels compile for an H100 (sm_90) without a GPU: what the CPU interpreter cannot show.

Each kernel is compiled from the launch its launcher would make at VQFR's largest shapes, with Triton's compiler
and the ptxas that ships with triton; the full sweep over every config is ``python -m kernels.aot_check``.
"""

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
        "deform_conv backward (weight)", "nearest_code",
    }
    for r in results:
        assert r.get("ok"), f"{r['kernel']} {r['config']}: {r.get('error')}"
        assert r["spill_bytes"] == 0, r

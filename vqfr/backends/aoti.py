"""AOTInductor backend for ``.pt2`` packages built by ``export/aoti.py`` (``torch._inductor.aoti_load_package``).

A package is compiled for one device (the sidecar's ``extra.device``, else CUDA when ``built_with`` records a
compute capability) and one torch version; the table has a CUDA row and a CPU row and each accepts only packages for
its device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vqfr.backends.base import Backend, BackendEntry, cuda_missing, pad_batch
from vqfr.errors import BackendUnavailable, EngineError
from vqfr.sidecar import EngineMeta

__all__ = ["AOTIBackend", "package_device"]


def package_device(meta: EngineMeta | None) -> str | None:
    """``"cuda"`` / ``"cpu"``: what the package was compiled for, from the sidecar; None if unknown."""
    if meta is None:
        return None
    device = meta.extra.get("device") or meta.built_with.get("device")
    if device:
        return str(device).split(":")[0]
    return "cuda" if meta.built_with.get("compute_capability") else "cpu"


def _capability_problem(meta: EngineMeta | None, device: torch.device | None) -> str | None:
    """Why a package compiled for one GPU architecture cannot run on ``device`` (None: the current GPU), or None."""
    built = str(meta.built_with.get("compute_capability") or "") if meta is not None else ""
    here = "{}.{}".format(*torch.cuda.get_device_capability(device)) if built else ""
    if built == here:
        return None
    return f"package compiled for compute capability {built}, {'this GPU' if device is None else device} is {here}"


class AOTIBackend(Backend):
    """Runs an AOTInductor package."""

    @classmethod
    def check(cls, entry: BackendEntry, meta: EngineMeta | None) -> tuple[str | None, str]:
        if not hasattr(torch._inductor, "aoti_load_package"):
            return f"this torch ({torch.__version__}) has no torch._inductor.aoti_load_package", ""
        if entry.device == "cuda":
            reason = cuda_missing()
            if reason:
                return reason, ""
        return None, f"torch {torch.__version__}"

    @classmethod
    def engine_problem(cls, entry: BackendEntry, meta: EngineMeta | None) -> str | None:
        if meta is None:
            return None
        built = package_device(meta)
        if built is not None and built != entry.device:
            return f"the package was compiled for {built}"
        built_torch = str(meta.built_with.get("torch") or "")
        if built_torch and built_torch.split("+")[0] != torch.__version__.split("+")[0]:
            return f"package built with torch {built_torch}, this is torch {torch.__version__}; rebuild it"
        return _capability_problem(meta, None) if entry.device == "cuda" else None

    def load(self) -> None:
        import torch._inductor

        # A package calls our opaque custom ops through the dispatcher: they must be registered before it loads
        # ("Could not find schema for vqfr::nearest_code" otherwise; export/aoti.py).
        import kernels.ops  # noqa: F401

        path = Path(self.engine)
        if self.requested_precision not in ("auto", self.precision):
            raise EngineError(f"was compiled in {self.precision}; precision {self.requested_precision} was asked",
                              path=path, fix=f"re-export with --precision {self.requested_precision} or use auto")
        # engine_problem judged the current GPU; this is the one asked for (cuda:N may be another model)
        problem = _capability_problem(self.meta, self.device) if self.device.type == "cuda" else None
        if problem:
            raise EngineError(problem, path=path, fix=f"rebuild it on that GPU (CUDA_VISIBLE_DEVICES="
                              f"{self.device.index or 0} python -m export.aoti --device cuda), or pick a GPU of the "
                              "compute capability it was compiled for")
        # cuda:N loads onto GPU N; -1 (plain cuda, or the CPU) is the current GPU, aoti_load_package's default
        index = self.device.index if self.device.type == "cuda" and self.device.index is not None else -1
        try:
            self._runner: Any = torch._inductor.aoti_load_package(str(path), device_index=index)
        except (RuntimeError, OSError, ValueError) as exc:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "CUDA" in text or "cuda" in text:
                raise BackendUnavailable(f"cannot start the package here ({text})", path=path,
                                         fix="rebuild it on this machine with python -m export.aoti") from exc
            raise EngineError(f"is not a loadable AOTInductor package ({text})", path=path,
                              fix="re-export it with python -m export.aoti") from exc
        self.loaded = True

    @torch.inference_mode()
    def infer(self, x: Tensor, fidelity: Tensor) -> Tensor:
        # Packages of every precision take float32 inputs (export.aoti casts inside the compiled graph); a package
        # reads its inputs' memory as the dtype it was compiled for, whatever tensors it is given.
        n = x.shape[0]
        x, fidelity = pad_batch(x, fidelity.reshape(-1), self.fixed_batch or 1)
        args = [x.to(self.device, torch.float32).contiguous()]
        if self.takes_fidelity:
            args.append(fidelity.to(self.device, torch.float32).contiguous())
        out = self._runner(*args)
        return (out[0] if isinstance(out, (list, tuple)) else out)[:n]

    def close(self) -> None:
        self._runner = None
        super().close()

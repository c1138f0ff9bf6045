"""Test configuration: CPU by default, Triton through its interpreter, poisoned allocations, seeds.

- ``TRITON_INTERPRET=1`` is set before any kernel module is imported (it is read when ``@triton.jit``
  runs), unless a CUDA device is present, so Triton kernels run on CPU tensors here and in CI.
- ``torch.use_deterministic_algorithms(True)`` with ``fill_uninitialized_memory`` makes every
  ``torch.empty`` / ``at::empty`` (Python and C++) come back NaN-filled, so an output element a kernel
  forgets to write shows up as NaN instead of stale memory that happens to look right.
- ``BIF_FAST_REQUIRE_EXT=1`` (set by .ci/run) turns the skip of extension tests into a failure, so CI
  proves the extension is really built and used.
"""

from __future__ import annotations

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from bif_fast import _ext  # noqa: E402


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        f"bif_fast._C: {'loaded' if _ext.HAS_EXT else 'missing: ' + str(_ext.EXT_IMPORT_ERROR)}",
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, cuda={_HAS_CUDA}",
    ]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests marked `triton` run kernels on CPU tensors through the interpreter; on a GPU machine
    # (interpreter off) the `cuda` tests run the same kernels for real instead.
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        skip = pytest.mark.skip(reason="CPU Triton tests need TRITON_INTERPRET=1 (set automatically without a GPU)")
        for item in items:
            if "triton" in item.keywords and "test_kernels_compile_for_sm90" not in item.name:
                item.add_marker(skip)
    if not _HAS_CUDA:
        skip_cuda = pytest.mark.skip(reason="no CUDA device")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed_and_poison():
    torch.manual_seed(0)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev)
    if _HAS_CUDA:
        torch.cuda.empty_cache()


def require_ext() -> None:
    """Skip (or fail, under BIF_FAST_REQUIRE_EXT=1) when bif_fast._C is not loaded."""
    if _ext.HAS_EXT:
        return
    msg = f"bif_fast._C unavailable: {_ext.EXT_IMPORT_ERROR}"
    if os.environ.get("BIF_FAST_REQUIRE_EXT", "0") == "1":
        pytest.fail(msg + " (BIF_FAST_REQUIRE_EXT=1)")
    pytest.skip(msg)


@pytest.fixture(params=["torch", "ext"])
def cov_backend(request: pytest.FixtureRequest) -> str:
    """Every running-covariance test runs on the torch reference and on the compiled extension."""
    if request.param == "ext":
        require_ext()
    return request.param

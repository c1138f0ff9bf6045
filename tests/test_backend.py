"""Backend dispatch: resolution order, env override, explicit requests, simulated missing extension."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from bif_fast import _backend, _ext
from bif_fast._backend import resolve_backend


def test_torch_is_always_available():
    assert resolve_backend("running_cov", "cpu", "torch") == "torch"


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown op"):
        resolve_backend("nope", "cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("running_cov", "cpu", "cuda")


def test_env_override_wins(monkeypatch):
    monkeypatch.setenv("BIF_FAST_BACKEND", "torch")
    assert resolve_backend("running_cov", "cpu", "ext") == "torch"


def test_op_without_that_backend_raises():
    with pytest.raises(RuntimeError, match="has no triton backend"):
        resolve_backend("running_cov", "cpu", "triton")


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_ext, "HAS_EXT", False)
    monkeypatch.setattr(_ext, "EXT_IMPORT_ERROR", "simulated: not built")
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(RuntimeWarning, match="simulated: not built; using the torch backend for running_cov"):
        assert resolve_backend("running_cov", "cpu") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("running_cov", "cpu") == "torch"  # warned once only
    with pytest.raises(RuntimeError, match="requested for running_cov but unavailable: simulated"):
        resolve_backend("running_cov", "cpu", "ext")


def test_triton_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backend.triton_unavailable_reason(torch.device("cpu")) is not None
    with pytest.raises(RuntimeError, match="Triton kernels need a CUDA device"):
        resolve_backend("sgld_update", "cpu", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    expected = None if _backend.importlib.util.find_spec("triton") else "triton is not installed"
    assert _backend.triton_unavailable_reason(torch.device("cpu")) == expected


def test_import_works_with_extension_disabled():
    code = (
        "import bif_fast, torch; from bif_fast import _ext; assert not _ext.HAS_EXT; "
        "import warnings; warnings.simplefilter('ignore'); "
        "a = bif_fast.RunningCrossCovariance(3, 2); a.update(torch.randn(4, 3), torch.randn(4, 2)); "
        "print(a.backend)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**__import__("os").environ, "BIF_FAST_DISABLE_EXT": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "torch"


def test_info_command_reports_backends():
    out = subprocess.run([sys.executable, "-m", "bif_fast", "info"], capture_output=True, text=True, check=True)
    assert "bif_fast._C:" in out.stdout
    assert "running_cov" in out.stdout
    assert ("loaded" in out.stdout) == _ext.HAS_EXT

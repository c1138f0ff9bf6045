"""Guarded import of the compiled extension ``bif_fast._C``.

``HAS_EXT`` says whether it loaded, ``EXT_IMPORT_ERROR`` why not; ``C`` is the loaded module (None when
it did not load). ``BIF_FAST_DISABLE_EXT=1``
skips loading it (the escape hatch when a stale build misbehaves).
"""

from __future__ import annotations

import os
from types import ModuleType

import torch  # noqa: F401  (the extension links against libtorch: load it first)

C: ModuleType | None = None
HAS_EXT: bool = False
EXT_IMPORT_ERROR: str | None = None

if os.environ.get("BIF_FAST_DISABLE_EXT", "0") == "1":
    EXT_IMPORT_ERROR = "disabled by BIF_FAST_DISABLE_EXT=1"
else:
    try:
        from bif_fast import _C as _loaded  # type: ignore[attr-defined]

        C = _loaded
        HAS_EXT = True
    except ImportError as exc:
        EXT_IMPORT_ERROR = (
            f"bif_fast._C is not built or does not load ({exc}); reinstall with "
            "`pip install -e . --no-build-isolation` and BIF_FAST_BUILD_EXT=1 to see the build error"
        )


def ext_has_cuda() -> bool:
    """Whether the loaded extension was compiled with its CUDA kernels."""
    return C is not None and bool(C.built_with_cuda())

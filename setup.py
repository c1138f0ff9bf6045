"""Build script: declares the optional compiled extension ``bif_fast._C``.

Metadata lives in pyproject.toml. Switches (environment variables):

    BIF_FAST_BUILD_EXT   auto (default) | 0 | 1
        auto: build the C++ extension; add the CUDA sources when torch is a CUDA build and a usable nvcc
              is found. If the CUDA build fails, rebuild C++-only; if that fails too, install pure Python.
              Every outcome is printed in one line starting with "bif_fast:".
        0:    no extension (pure-Python install, torch fallbacks everywhere).
        1:    build the extension or fail the install.
    BIF_FAST_BUILD_CUDA  auto (default) | 0 | 1     force the CUDA part off / on (on: fail if it cannot build)
    TORCH_CUDA_ARCH_LIST / BIF_FAST_CUDA_ARCHS      CUDA architectures (default: torch's choice)
    MAX_JOBS                                        parallel compile jobs (torch's BuildExtension)
    DEBUG=1                                         -O0 -g

Install from source with ``pip install -e . --no-build-isolation`` so the extension is compiled against
the torch that is installed in the environment.
"""

from __future__ import annotations

import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
# Turing through Blackwell, plus PTX for newer GPUs (CUDA 13 no longer targets older ones).
DEFAULT_CUDA_ARCHS = "7.5;8.0;9.0;10.0;12.0+PTX"


def _log(msg: str) -> None:
    print(f"bif_fast: {msg}", file=sys.stderr, flush=True)


def _mode(name: str, default: str = "auto") -> str:
    value = os.environ.get(name, default).strip().lower()
    aliases = {"true": "1", "on": "1", "yes": "1", "false": "0", "off": "0", "no": "0"}
    value = aliases.get(value, value)
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"bif_fast: {name} must be auto, 0 or 1, got {value!r}")
    return value


def _cuda_unavailable_reason() -> str | None:
    """Why the CUDA sources cannot be built here, or None when they can be tried."""
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    cuda_home = _find_cuda_home(cpp_extension.CUDA_HOME)
    if cuda_home is None:
        return f"no CUDA toolkit with bin/nvcc and include/cuda_runtime.h found (CUDA_HOME={cpp_extension.CUDA_HOME})"
    if cuda_home != cpp_extension.CUDA_HOME:
        _log(f"using the CUDA toolkit at {cuda_home} (torch guessed {cpp_extension.CUDA_HOME})")
        cpp_extension.CUDA_HOME = cuda_home
    return None


def _is_toolkit(path: str | None) -> bool:
    return bool(path) and all(
        os.path.exists(os.path.join(path, *rel)) for rel in (("bin", "nvcc"), ("include", "cuda_runtime.h"))
    )


def _find_cuda_home(guess: str | None) -> str | None:
    """torch guesses CUDA_HOME from nvcc's location, which fails when nvcc is a copy outside the toolkit."""
    candidates = [guess, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    return next((c for c in candidates if _is_toolkit(c)), None)


def _extensions(build_ext_mode: str):
    if build_ext_mode == "0":
        _log("BIF_FAST_BUILD_EXT=0: building no extension (pure-Python install)")
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError as exc:
        if build_ext_mode == "1":
            raise SystemExit(f"bif_fast: BIF_FAST_BUILD_EXT=1 but torch is not importable: {exc}") from exc
        _log(
            "torch is not importable in the build environment, so no extension is built "
            "(install torch first and use `pip install --no-build-isolation`)"
        )
        return [], {}

    debug = os.environ.get("DEBUG", "0") == "1"
    # No -std flag: torch's BuildExtension picks the standard its headers need (C++17 or C++20).
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-math-errno lets sqrtf inline (results unchanged); -ffp-contract=off keeps a*b+c two roundings, as in
    # the torch and Triton twins, also in the AVX2 clones; OpenMP makes at::parallel_for parallel.
    cxx_flags += ["-fno-math-errno", "-ffp-contract=off"]
    link_flags: list[str] = []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    cpp_sources = [f"{CSRC}/running_cov.cpp", f"{CSRC}/sgld_update_cpu.cpp", f"{CSRC}/bindings.cpp"]

    cuda_mode = _mode("BIF_FAST_BUILD_CUDA")
    reason = "BIF_FAST_BUILD_CUDA=0" if cuda_mode == "0" else _cuda_unavailable_reason()
    if reason is not None and cuda_mode == "1":
        raise SystemExit(f"bif_fast: BIF_FAST_BUILD_CUDA=1 but {reason}")

    cpp_ext = cpp_extension.CppExtension(
        "bif_fast._C",
        cpp_sources,
        extra_compile_args={"cxx": list(cxx_flags)},
        extra_link_args=list(link_flags),
        include_dirs=[os.path.join(HERE, CSRC)],
    )
    if reason is not None:
        _log(f"building the C++ extension without CUDA kernels ({reason})")
        return [cpp_ext], {"fallback": None}

    archs = os.environ.get("BIF_FAST_CUDA_ARCHS")
    if archs:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    elif not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # torch asks the visible GPU for its architecture; on a build machine without one, name them.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        _log(f"no GPU visible: compiling CUDA code for TORCH_CUDA_ARCH_LIST={DEFAULT_CUDA_ARCHS}")
    nvcc_flags = (["-O0", "-g", "-G"] if debug else ["-O3"]) + ["--expt-relaxed-constexpr"]
    cuda_ext = cpp_extension.CUDAExtension(
        "bif_fast._C",
        cpp_sources + [f"{CSRC}/running_cov_cuda.cu"],
        extra_compile_args={"cxx": cxx_flags + ["-DBIF_FAST_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=list(link_flags),
        include_dirs=[os.path.join(HERE, CSRC)],
    )
    _log("building the C++ extension with the CUDA kernels")
    return [cuda_ext], {"fallback": cpp_ext}


def _build_ext_class(build_ext_mode: str, fallback):
    from torch.utils import cpp_extension

    class BuildExt(cpp_extension.BuildExtension):
        """torch's BuildExtension, with the fallbacks of BIF_FAST_BUILD_EXT=auto."""

        def build_extensions(self) -> None:
            # BuildExtension monkey-patches the compiler on every call; restore it before a retry.
            saved = (self.compiler.compile, self.compiler._compile)
            try:
                super().build_extensions()
                return
            except (Exception, SystemExit) as exc:  # compiler errors surface as several types
                first_error = exc
            if fallback is not None and _mode("BIF_FAST_BUILD_CUDA") != "1":
                _log(f"the CUDA part failed to build ({first_error!r:.300}); rebuilding C++-only")
                # setuptools' finalize_options set private fields on the original; the fallback needs them.
                for key, value in vars(self.extensions[0]).items():
                    if key.startswith("_") and not hasattr(fallback, key):
                        setattr(fallback, key, value)
                self.extensions = [fallback]
                self.compiler.compile, self.compiler._compile = saved
                try:
                    super().build_extensions()
                    _log("built the C++ extension without CUDA kernels")
                    return
                except (Exception, SystemExit) as exc:
                    first_error = exc
            if build_ext_mode == "1":
                raise first_error
            _log(
                f"the extension failed to build ({first_error!r:.300}); installing pure Python, "
                "bif_fast will use its torch fallbacks (BIF_FAST_BUILD_EXT=1 makes this an error)"
            )
            self.extensions = []

    return BuildExt


def main() -> None:
    build_ext_mode = _mode("BIF_FAST_BUILD_EXT")
    ext_modules, extra = _extensions(build_ext_mode)
    cmdclass = {}
    if ext_modules:
        cmdclass["build_ext"] = _build_ext_class(build_ext_mode, extra.get("fallback"))
    setup(ext_modules=ext_modules, cmdclass=cmdclass)


main()

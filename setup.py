"""Build pyops._C: one extension holding every pyops operator.

Layout rules the build relies on (see docs/ARCHITECTURE.md):
  csrc/**/*_cpu.cpp   CPU kernels, compiled once per CPU capability (DEFAULT, AVX2,
                      AVX512) with that capability's ISA flags; the best one the running
                      CPU supports is picked at load time.
  csrc/**/*_cuda.cu   CUDA kernels, compiled only for a CUDA build.
  csrc/**/*.cpp       everything else (schemas, autograd, dispatch), compiled once with
                      no ISA flags.

Environment:
  PYOPS_CUDA=0|1                 force a C++-only or a CUDA build (default: CUDA when a
                                 CUDA toolkit and a CUDA build of torch are present).
  TORCH_CUDA_ARCH_LIST           honoured; default "9.0" when no GPU is visible.
  PYOPS_CPU_CAPABILITIES         comma list restricting the CPU kernel copies (for
                                 quick local builds), e.g. "AVX2"; DEFAULT is always built.
  PYOPS_SANITIZE=1               compile and link the C++-only extension with
                                 AddressSanitizer and UndefinedBehaviorSanitizer (for
                                 scripts/sanitize.sh; importing it needs libasan preloaded).
"""

import glob
import json
import os
import shutil
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"

# ISA flags per CPU capability, as ATen compiles its own kernels. DEFAULT must stay first.
CPU_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-mbmi", "-mbmi2", "-mlzcnt"],
}


def _locate_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`; a wrapper script on PATH fools it."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


_cuda_home = _locate_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home  # must precede the cpp_extension import

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def _want_cuda():
    forced = os.environ.get("PYOPS_CUDA")
    if forced is not None:
        if forced not in ("0", "1"):
            sys.exit(f"PYOPS_CUDA must be 0 or 1, got {forced!r}")
        if forced == "1" and (torch.version.cuda is None or CUDA_HOME is None):
            sys.exit("PYOPS_CUDA=1 needs a CUDA build of torch and a CUDA toolkit "
                     f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def _want_sanitizers():
    value = os.environ.get("PYOPS_SANITIZE", "0")
    if value not in ("0", "1"):
        sys.exit(f"PYOPS_SANITIZE must be 0 or 1, got {value!r}")
    return value == "1"


# -O1 keeps sanitized runs reasonably fast while leaving stack traces readable; -g1 gives
# the reports file:line without full debug info. A UBSan finding aborts the process.
# -fno-wrapv undoes Python's -fwrapv (in the flags extensions inherit), under which signed
# overflow is defined and UBSan would not check it: index arithmetic must not overflow.
SANITIZER_COMPILE_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                           "-fno-sanitize-recover=undefined", "-fno-wrapv", "-O1", "-g1"]
SANITIZER_LINK_FLAGS = ["-fsanitize=address,undefined"]


def _cpu_capabilities():
    if sys.platform != "linux" or os.uname().machine not in ("x86_64", "AMD64"):
        return ["DEFAULT"]
    wanted = os.environ.get("PYOPS_CPU_CAPABILITIES")
    if not wanted:
        return list(CPU_CAPABILITY_FLAGS)
    names = [n.strip().upper() for n in wanted.split(",") if n.strip()]
    unknown = [n for n in names if n not in CPU_CAPABILITY_FLAGS]
    if unknown:
        sys.exit(f"PYOPS_CPU_CAPABILITIES: unknown {unknown}; known {list(CPU_CAPABILITY_FLAGS)}")
    return ["DEFAULT"] + [n for n in CPU_CAPABILITY_FLAGS if n in names and n != "DEFAULT"]


def _nvidia_wheel_includes():
    """CUDA library headers (cusparse.h, cublas_v2.h, ...) that torch's headers include
    may exist only inside the nvidia-* wheels torch was installed with."""
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def _default_cuda_archs():
    """The visible GPUs' archs; with none visible a short list (sm_90) keeps builds short."""
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
    return "9.0"


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


class BuildPyopsExtension(BuildExtension):
    """Adds per-CPU-capability compilation of the *_cpu.cpp kernel files, and keeps
    object files between builds so that ninja rebuilds only what changed."""

    def run(self):
        # pip's editable and wheel builds compile in a fresh temporary folder each time;
        # a persistent one per Python and variant keeps rebuilds incremental.
        if os.path.abspath(self.build_temp).startswith(tempfile.gettempdir()):
            variant = "cuda" if _want_cuda() else "cpu"
            tag = f"{sys.implementation.cache_tag}-{variant}"
            self.build_temp = os.path.join(ROOT, "build", f"temp-{tag}")
        super().run()

    def build_extension(self, ext):
        ext.include_dirs.append(_write_build_config(
            os.path.join(os.path.abspath(self.build_temp), "generated"), ext.pyops_build_config))
        cxx_flags = list(ext.extra_compile_args["cxx"])
        nvcc_flags = list(ext.extra_compile_args.get("nvcc", []))
        for capability in ext.pyops_cpu_capabilities:
            objects = self.compiler.compile(
                ext.pyops_cpu_kernel_sources,
                output_dir=os.path.join(self.build_temp, "cpu_" + capability),
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs={
                    "cxx": cxx_flags + CPU_CAPABILITY_FLAGS[capability] + [
                        f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"],
                    "nvcc": nvcc_flags,
                },
                depends=ext.depends,
            )
            ext.extra_objects.extend(objects)
        super().build_extension(ext)


def _write_build_config(folder, values):
    """Facts pyops.build_info() reports, as a generated header (no shell quoting of -D)."""
    text = "#pragma once\n// Generated by setup.py.\n" + "".join(
        f"#define {name} {json.dumps(value)}\n" for name, value in values.items())
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "pyops_build_config.h")
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:  # rewritten only on change: no needless rebuild
            f.write(text)
    return folder


def _extension():
    with_cuda = _want_cuda()
    sanitize = _want_sanitizers()
    if sanitize and with_cuda:
        sys.exit("PYOPS_SANITIZE=1 instruments the C++-only extension: set PYOPS_CUDA=0 too")
    capabilities = _cpu_capabilities()
    all_cpp = glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True)
    kernel_sources = _rel(p for p in all_cpp if p.endswith("_cpu.cpp"))
    sources = _rel(p for p in all_cpp if not p.endswith("_cpu.cpp"))
    if with_cuda:
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*_cuda.cu"), recursive=True))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = _default_cuda_archs()

    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"]
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    link = ["-fopenmp"]
    if sanitize:
        cxx += SANITIZER_COMPILE_FLAGS  # after -O3: the last -O wins
        link += SANITIZER_LINK_FLAGS
    include_dirs = [os.path.join(ROOT, "csrc")]
    kwargs = dict(
        name="pyops._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
        depends=_rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True)
                     + glob.glob(os.path.join(ROOT, "csrc", "**", "*.cuh"), recursive=True)),
    )
    if with_cuda:
        cxx.append("-DPYOPS_WITH_CUDA")
        nvcc.append("-DPYOPS_WITH_CUDA")
        include_dirs += _nvidia_wheel_includes()
        ext = CUDAExtension(**kwargs)
    else:
        ext = CppExtension(**kwargs)
    ext.pyops_cpu_kernel_sources = kernel_sources
    ext.pyops_build_config = {
        "PYOPS_VERSION": VERSION,
        "PYOPS_TORCH_VERSION": torch.__version__,
        "PYOPS_CPU_CAPABILITIES": ",".join(capabilities),
        "PYOPS_CUDA_ARCHS": os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else "",
    }
    ext.pyops_cpu_capabilities = capabilities
    return ext


setup(
    name="pyops",
    version=VERSION,
    description="Fused CUDA and vectorized CPU kernels for PyTorch",
    packages=find_packages(include=["pyops", "pyops.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildPyopsExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    zip_safe=False,
)

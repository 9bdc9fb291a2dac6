#!/usr/bin/env python3
"""The two quick-start commands of pyops, from a fresh clone:

    python scripts/run.py bench [pyops.bench options]   # the benchmark suite
    python scripts/run.py test  [pytest options]        # the test suite

Each first makes sure what it needs is installed, idempotently: torch (if absent),
the tools it needs (ninja; pytest, hypothesis and scikit-learn for the tests; matplotlib
for the bench chart), and
pyops itself, built against the installed torch with
`pip install --no-build-isolation -e .`. The build is incremental (ninja) and skipped
entirely while the sources, the torch version and the PYOPS_* build variables are
unchanged since the last successful install.
"""

import hashlib
import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP = os.path.join(ROOT, "build", ".pyops-install-stamp")
BUILD_ENV = ("PYOPS_CUDA", "PYOPS_CPU_CAPABILITIES", "PYOPS_SANITIZE", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME",
             "CXX")
# What each command needs besides torch and pyops: import name -> pip package.
TOOLS = {
    "test": {"pytest": "pytest", "hypothesis": "hypothesis", "sklearn": "scikit-learn"},
    "bench": {"matplotlib": "matplotlib"},
}
BUILD_TOOLS = {"ninja": "ninja", "setuptools": "setuptools", "wheel": "wheel"}


def say(message):
    print(f"[pyops] {message}", flush=True)


def pip(*args):
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
                           *args])


def ensure_modules(packages):
    missing = [package for module, package in packages.items()
               if importlib.util.find_spec(module) is None]
    if missing:
        say(f"installing {' '.join(missing)}")
        pip(*missing)


def torch_version():
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def source_fingerprint(torch_ver):
    digest = hashlib.sha256(torch_ver.encode())
    for var in BUILD_ENV:
        digest.update(f"{var}={os.environ.get(var, '')}".encode())
    paths = [os.path.join(ROOT, name) for name in ("setup.py", "pyproject.toml")]
    for folder, _, files in os.walk(os.path.join(ROOT, "csrc")):
        paths += [os.path.join(folder, f) for f in files]
    for path in sorted(paths):
        if os.path.isfile(path):
            digest.update(path.encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def pyops_imports():
    probe = subprocess.run([sys.executable, "-c", "import pyops"], cwd=ROOT,
                           capture_output=True, text=True)
    return probe.returncode == 0


def ensure_pyops(torch_ver):
    fingerprint = source_fingerprint(torch_ver)
    if os.path.exists(STAMP) and open(STAMP).read() == fingerprint and pyops_imports():
        say("pyops is up to date")
        return
    say(f"building pyops against torch {torch_ver} (incremental; a first build takes minutes)")
    env = dict(os.environ)
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
                           "--no-build-isolation", "--no-deps", "-e", ROOT], env=env)
    os.makedirs(os.path.dirname(STAMP), exist_ok=True)
    with open(STAMP, "w") as f:
        f.write(fingerprint)


def main(argv):
    if not argv or argv[0] not in TOOLS:
        sys.exit(__doc__)
    command, rest = argv[0], argv[1:]
    torch_ver = torch_version()
    if torch_ver is None:
        say("torch is not installed: installing it")
        pip("torch>=2.11")
        torch_ver = torch_version()
    ensure_modules({**BUILD_TOOLS, **TOOLS[command]})
    ensure_pyops(torch_ver)
    if command == "test":
        cmd = [sys.executable, "-m", "pytest", os.path.join(ROOT, "tests"), "-q", *rest]
    else:
        cmd = [sys.executable, "-m", "pyops.bench", *rest]
    say(" ".join(cmd))
    sys.exit(subprocess.call(cmd, cwd=ROOT))


if __name__ == "__main__":
    main(sys.argv[1:])

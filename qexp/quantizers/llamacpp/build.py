"""Build llama.cpp's quantizers (libggml-base) from the llama-cpp-python source release.

`qexp-build-ggml` (run by `make setup`) downloads the pinned llama-cpp-python sdist from
PyPI, checks its sha256, unpacks only the vendored `ggml/` tree and builds the one shared
library that holds every GGUF quantizer (`ggml_quantize_chunk`), about a minute on two
cores. It also installs the same release's HF -> GGUF converter (`convert_hf_to_gguf.py`,
its `conversion/` package and `gguf-py`), which `save_quantized=true` runs to write a .gguf
file llama.cpp loads. `pip install 'qexp[llamacpp]'` (the whole llama-cpp-python package,
a 15-30 min build) gives the same library; either is found by `qexp.quantizers.llamacpp.ggml`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from qexp.core.console import console

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
COMMIT = "0c1e570"  # llama.cpp commit vendored in that sdist (ggml_commit() reports it)
INDEX = os.environ.get("QEXP_PYPI_SIMPLE", "https://pypi.org/simple")
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_NATIVE=OFF",  # the quantizers are compiled without -march either way
    "-DGGML_OPENMP=OFF",
    "-DGGML_CPU=OFF",  # no compute backend: qexp only quantizes
    "-DGGML_CCACHE=OFF",
    "-DGGML_BUILD_TESTS=OFF",
    "-DGGML_BUILD_EXAMPLES=OFF",
    "-DGIT_EXE=/bin/true",  # the sources are no git checkout: never ask an enclosing repo
]
INFO = "build.json"  # next to the library: what it was built from
CONVERTER = "convert"  # the converter's directory next to the library
PREFIX = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "LICENSE")
LOG = console("qexp-build-ggml")


def default_dir() -> Path:
    """Where the library is installed: inside the running environment."""
    return Path(sys.prefix) / "share" / "qexp" / f"llama.cpp-{COMMIT}"


def _sdist_url() -> str:
    page = urllib.request.urlopen(f"{INDEX}/{PACKAGE}/", timeout=60).read().decode()
    m = re.search(rf'href="([^"]*/{re.escape(SDIST)})(#[^"]*)?"', page)
    if not m:
        raise SystemExit(f"qexp-build-ggml: {SDIST} not listed at {INDEX}/{PACKAGE}/")
    return m.group(1)


def download(dest: Path) -> Path:
    """The sdist at `dest/SDIST`, fetched once and checked against the pinned sha256."""
    path = dest / SDIST
    if not path.exists():
        url = _sdist_url()
        LOG.info("downloading %s", url)
        tmp = path.with_suffix(".part")
        with urllib.request.urlopen(url, timeout=300) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
        tmp.replace(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256:
        path.unlink()
        raise SystemExit(f"qexp-build-ggml: {SDIST} has sha256 {digest}, expected {SHA256}")
    return path


def converter_dir(out: Path | None = None) -> Path:
    """Where the converter is installed (holds convert_hf_to_gguf.py and gguf-py/)."""
    return (out or default_dir()) / CONVERTER


def _extract(sdist: Path, dest: Path, paths: tuple[str, ...]) -> Path:
    """Extract the vendored llama.cpp files under `paths` into dest; returns their root."""
    with tarfile.open(sdist) as tar:
        members = [
            m for m in tar.getmembers() if m.name.startswith(tuple(PREFIX + p for p in paths))
        ]
        tar.extractall(dest, members=members, filter="data")
    return dest / PREFIX


def unpack_ggml(sdist: Path, dest: Path) -> Path:
    """Extract only vendor/llama.cpp/ggml (and the licence) from the sdist."""
    src = _extract(sdist, dest, ("ggml/", "LICENSE")) / "ggml"
    # the sdist leaves out ggml.pc.in, which ggml's CMakeLists configures unconditionally
    (src / "ggml.pc.in").touch()
    return src


def install_converter(sdist: Path, out: Path) -> Path:
    """Install the sdist's convert_hf_to_gguf.py, conversion/ and gguf-py/ into `out`."""
    dest = converter_dir(out)
    with tempfile.TemporaryDirectory(prefix="qexp-convert-", dir=out) as tmp:
        root = _extract(sdist, Path(tmp), CONVERTER_FILES)
        staged = Path(tmp) / "staged"
        staged.mkdir()
        for name in ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE"):
            (root / name).rename(staged / name)
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)
    return dest


def build(out: Path, keep: Path | None = None, library: bool = True) -> Path:
    """Download the sdist, build and install libggml-base into `out` (unless `library` is
    false) and install the converter; returns the install directory."""
    for tool in ("cmake", "c++") if library else ():
        if shutil.which(tool) is None:
            raise SystemExit(f"qexp-build-ggml: needs cmake and a C++ compiler; `{tool}` not found")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qexp-ggml-") as tmp:
        work = Path(tmp)
        sdist = download(keep or work)
        LOG.info("installing llama.cpp's converter (convert_hf_to_gguf.py)")
        install_converter(sdist, out)
        if library:
            _build_library(sdist, work, out)
    return out


def _build_library(sdist: Path, work: Path, out: Path) -> None:
    src = unpack_ggml(sdist, work)
    bdir = work / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    jobs = str(os.cpu_count() or 1)
    LOG.info("building libggml-base (llama.cpp %s) ...", COMMIT)
    for cmd in (
        ["cmake", "-S", str(src), "-B", str(bdir), *gen, *CMAKE_FLAGS],
        ["cmake", "--build", str(bdir), "-j", jobs, "--target", "ggml-base"],
    ):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            sys.stderr.write(r.stdout[-4000:] + r.stderr[-4000:])
            raise SystemExit(f"qexp-build-ggml: `{' '.join(cmd[:3])} ...` failed")
    lib = next(p for p in bdir.rglob("libggml-base.so*") if not p.is_symlink())
    staged = out / ".libggml-base.so.tmp"
    shutil.copy2(lib, staged)
    shutil.copy2(src.parent / "LICENSE", out / "LICENSE")
    info = {"package": f"{PACKAGE} {VERSION}", "sha256": SHA256, "commit": COMMIT}
    (out / INFO).write_text(json.dumps(info, indent=1) + "\n")
    staged.replace(out / "libggml-base.so")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qexp-build-ggml", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=default_dir(), help="install directory")
    p.add_argument("--keep-sdist", type=Path, help="directory to keep the downloaded sdist in")
    p.add_argument("--force", action="store_true", help="rebuild even if already installed")
    args = p.parse_args(argv)
    lib = args.out / "libggml-base.so"
    have_lib = lib.exists() and not args.force
    if have_lib and (converter_dir(args.out) / "convert_hf_to_gguf.py").exists():
        LOG.info("libggml-base and the converter already installed: %s", args.out)
        return 0
    if args.keep_sdist:
        args.keep_sdist.mkdir(parents=True, exist_ok=True)
    LOG.info("installed %s", build(args.out, args.keep_sdist, library=not have_lib))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

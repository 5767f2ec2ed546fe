"""Build ddvae_fast: the Python package, the Triton kernels and the C++ kernels.

Every ``csrc/<name>.cpp`` becomes the extension module ``ddvae_fast._<name>``.
The C++ code works on raw buffers (pointers, sizes, strides) handed over from
Python, so it needs pybind11 and a C++ compiler but no torch headers.
"""

import glob
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    # OpenMP: the modules run on torch's own OpenMP team (csrc/common.h says why).
    # A compiler without OpenMP needs the flag dropped; the kernels then run on
    # the calling thread.
    flags = ["-O3", "-std=c++17", "-ffp-contract=fast", "-fopenmp"]
    if os.environ.get("DDVAE_FAST_NATIVE", "0") == "1":
        flags.append("-march=native")
    # Test-only entry points (csrc: the `math`, `philox4x32_10`, `shape_values`,
    # `math_values` functions and refill's `park_all`) are compiled only on request;
    # ./run.sh sets this for the test suite.
    if os.environ.get("DDVAE_FAST_TEST_HOOKS", "0") == "1":
        flags.append("-DDDF_TEST_HOOKS")
    headers = sorted(glob.glob(os.path.join("csrc", "*.h")))
    exts = []
    for src in sorted(glob.glob(os.path.join("csrc", "*.cpp"))):
        name = os.path.splitext(os.path.basename(src))[0]
        exts.append(
            Pybind11Extension(
                f"ddvae_fast._{name}",
                [src],
                depends=headers,
                extra_compile_args=flags,
                extra_link_args=["-fopenmp"],
            )
        )
    return exts


setup(
    name="ddvae_fast",
    version="0.1.0",
    description="Fast kernels and reference math for the Deterministic-Decoder VAE",
    python_requires=">=3.10",
    packages=[
        "ddvae_fast",
        "ddvae_fast.distributions",
        "ddvae_fast.loss",
        "ddvae_fast.sampling",
        "ddvae_fast.seqvae",
        "ddvae_fast.kernels",
    ],
    # Triton kernels live in the top-level kernels/ folder (the project layout)
    # and are installed as ddvae_fast.kernels.
    package_dir={"ddvae_fast": "ddvae_fast", "ddvae_fast.kernels": "kernels"},
    package_data={"ddvae_fast.seqvae": ["configs/*.toml"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": build_ext},
    # The core library: torch, numpy and triton only.
    install_requires=[
        # Pinned: an unpinned torch makes pip resolve a multi-GB CUDA build.
        "torch==2.13.0",
        "numpy",
        "triton>=3.3",
    ],
    extras_require={
        # The application (ddvae_fast.seqvae: model, trainer, CLI, experiments).
        "app": ["tqdm", "matplotlib", "rdkit"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "scipy", "ruff==0.17.6"],
    },
    entry_points={"console_scripts": ["ddvae-fast=ddvae_fast.seqvae.cli:main"]},
)

"""Build hook for the native CPU attention extension apex_grpc._cpu_attention.

pyproject.toml holds all project metadata; this file only adds ext_modules. The C++ sources
(kernels/cpu_attention) need only the pybind11 headers: from the pybind11 package when it is
installed (pyproject's build requirements), else the copy that torch ships under torch/include,
so `pip install --no-build-isolation -e .` works in an environment that has torch only.
"""

from __future__ import annotations

import glob
import importlib.util
import os

from setuptools import Extension, setup

SOURCE_DIR = os.path.join("kernels", "cpu_attention")


def pybind11_include_dir() -> str:
    try:
        import pybind11

        return pybind11.get_include()
    except ImportError:
        pass
    # Locate torch without importing it (importing torch takes seconds and is not needed).
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.origin is not None:
        torch_include = os.path.join(os.path.dirname(spec.origin), "include")
        if os.path.exists(os.path.join(torch_include, "pybind11", "pybind11.h")):
            return torch_include
    raise RuntimeError(
        "building apex_grpc._cpu_attention needs the pybind11 headers: "
        "pip install pybind11 (or install torch, which ships them)"
    )


def cpu_attention_extension() -> Extension:
    # Relative paths: setuptools rejects absolute source paths in sdists.
    sources = sorted(glob.glob(os.path.join(SOURCE_DIR, "*.cpp")))
    depends = sorted(glob.glob(os.path.join(SOURCE_DIR, "*.h")))
    depends += sorted(glob.glob(os.path.join(SOURCE_DIR, "*.inc")))
    return Extension(
        "apex_grpc._cpu_attention",
        sources=sources,
        depends=depends,
        include_dirs=[pybind11_include_dir(), SOURCE_DIR],
        language="c++",
        # No -march: ISA-specific functions carry target attributes and are chosen at run time,
        # so one binary runs on any CPU of the architecture.
        extra_compile_args=["-std=c++17", "-O3", "-fvisibility=hidden", "-pthread"],
        extra_link_args=["-pthread"],
    )


setup(ext_modules=[cpu_attention_extension()])

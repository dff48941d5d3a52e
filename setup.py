"""codellama-rt: a lean, fast inference runtime for CodeLlama."""
import os
import sys

# The repository's kernels/ must not shadow the PyPI package `kernels` (a transformers dependency whose
# setuptools entry points run during this build when it is installed without build isolation).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from setuptools import setup  # noqa: E402

NATIVE_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]


def native_extension() -> dict:
    """The native CPU kernels, built where a C++ compiler is present at install time (any failure leaves one out,
    and its Python side says so):
    - csrc/cpu_native.cpp -> codellama_rt._cpu_native, the torch extension, where torch is importable at build
      time (scripts/setup.sh installs without build isolation, so the venv's torch is there); without it
      kernels/cpu_native.py runs the PyTorch path;
    - csrc/lite.cpp -> codellama_rt._cpu_lite, the same decode step as a torch-free C library (codellama_rt.lite
      loads it with ctypes)."""
    from setuptools import Extension
    from setuptools.command.build_ext import build_ext

    headers = sorted(os.path.join("csrc", f) for f in os.listdir(os.path.join(_HERE, "csrc")) if f.endswith(".h"))
    lite = Extension("codellama_rt._cpu_lite", ["csrc/lite.cpp"], depends=headers, language="c++",
                     define_macros=[("CLRT_LITE", "1")], extra_compile_args=["-std=c++17", *NATIVE_FLAGS],
                     extra_link_args=["-fopenmp"])
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("codellama-rt: torch is not importable at build time; native CPU kernels not built", file=sys.stderr)
        base, exts = build_ext, [lite]
    else:
        base = BuildExtension
        exts = [CppExtension("codellama_rt._cpu_native", ["csrc/cpu_native.cpp"], depends=headers,
                             extra_compile_args=NATIVE_FLAGS, extra_link_args=["-fopenmp"]), lite]

    class OptionalBuild(base):
        def run(self):
            try:
                super().run()
            except Exception as e:  # no compiler (its ABI check fails first), an unknown flag: the PyTorch path works
                print(f"codellama-rt: native CPU kernels not built ({type(e).__name__}: {e}); "
                      "the PyTorch path will run", file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # one failing leaves the other
                print(f"codellama-rt: {ext.name} not built ({type(e).__name__}: {e})", file=sys.stderr)

    return {"ext_modules": exts, "cmdclass": {"build_ext": OptionalBuild}}


# fastapi: app.add_api_route / exception handlers as used; uvicorn: Server.startup(sockets=...);
# prometheus_client: custom collectors with HistogramMetricFamily
SERVE = ["fastapi>=0.110", "uvicorn>=0.29", "prometheus_client>=0.20"]

setup(
    name="codellama-rt",
    version="0.1.0",
    description="Lean CodeLlama inference runtime with Triton kernels and a PyTorch reference path",
    python_requires=">=3.10",
    packages=["codellama_rt", "codellama_rt.kernels", "codellama_rt.bench", "codellama_rt.checkpoint",
              "codellama_rt.cli", "codellama_rt.distributed", "codellama_rt.engine", "codellama_rt.lite",
              "codellama_rt.model", "codellama_rt.quant", "codellama_rt.server", "codellama_rt.tokenizer"],
    package_dir={"codellama_rt": "runtime", "codellama_rt.kernels": "kernels"},
    # the embedded default model (see runtime/default_model/README.md)
    package_data={"codellama_rt": ["default_model/*.json", "default_model/*.safetensors",
                                   "default_model/*.model", "default_model/*.md"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.6,<3.7",  # kernels/_interpreter_shims.py patches private interpreter functions of 3.6
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "tqdm>=4.60",  # the loading progress bar
        # triton's CPU interpreter (TRITON_INTERPRET=1) needs numpy < 2.3
        "numpy>=1.24,<2.3",
    ],
    extras_require={
        # PNG charts of the benchmark report and `codellama-rt mask --png`; without it both say how to get it
        "plots": ["matplotlib>=3.5"],
        # `codellama-rt serve` (the OpenAI-compatible HTTP server); without it serve says how to get it
        "serve": SERVE,
        "test": ["pytest>=8", "pytest-xdist>=3.2", "pytest-benchmark", "hypothesis", "transformers>=4.45",
                 "matplotlib>=3.5", "ruff>=0.5", "openai>=1.40", "httpx>=0.27", *SERVE],
    },
    entry_points={"console_scripts": ["codellama-rt=codellama_rt.cli:main"]},
    **native_extension(),
)

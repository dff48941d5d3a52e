"""codellama-rt: a lean, fast inference runtime for CodeLlama."""
from setuptools import setup

setup(
    name="codellama-rt",
    version="0.1.0",
    description="Lean CodeLlama inference runtime with Triton kernels and a PyTorch reference path",
    python_requires=">=3.10",
    packages=["codellama_rt", "codellama_rt.kernels", "codellama_rt.bench"],
    package_dir={"codellama_rt": "runtime", "codellama_rt.kernels": "kernels"},
    # the embedded default model (see runtime/default_model/README.md)
    package_data={"codellama_rt": ["default_model/*.json", "default_model/*.safetensors",
                                   "default_model/*.model", "default_model/*.md"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.6",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        # triton's CPU interpreter (TRITON_INTERPRET=1) needs numpy < 2.3
        "numpy>=1.24,<2.3",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark", "hypothesis", "transformers>=4.45", "ruff>=0.5"],
    },
    entry_points={"console_scripts": ["codellama-rt=codellama_rt.cli:main"]},
)

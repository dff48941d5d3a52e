"""codellama-rt: a lean, fast inference runtime for CodeLlama."""
from setuptools import setup

# fastapi: app.add_api_route / exception handlers as used; uvicorn: Server.startup(sockets=...);
# prometheus_client: custom collectors with HistogramMetricFamily
SERVE = ["fastapi>=0.110", "uvicorn>=0.29", "prometheus_client>=0.20"]

setup(
    name="codellama-rt",
    version="0.1.0",
    description="Lean CodeLlama inference runtime with Triton kernels and a PyTorch reference path",
    python_requires=">=3.10",
    packages=["codellama_rt", "codellama_rt.kernels", "codellama_rt.bench", "codellama_rt.checkpoint",
              "codellama_rt.cli", "codellama_rt.engine", "codellama_rt.model", "codellama_rt.quant",
              "codellama_rt.server", "codellama_rt.tokenizer"],
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
        "test": ["pytest>=8", "pytest-benchmark", "hypothesis", "transformers>=4.45", "matplotlib>=3.5",
                 "ruff>=0.5", "openai>=1.40", "httpx>=0.27", *SERVE],
    },
    entry_points={"console_scripts": ["codellama-rt=codellama_rt.cli:main"]},
)

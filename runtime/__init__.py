"""codellama-rt: a lean, fast inference runtime for CodeLlama.

The names below are imported on first use (PEP 562), so that `codellama_rt.lite` and `codellama_rt.tokenizer`
can be used without importing torch.
"""
import importlib

_EXPORTS = {"load": ".api", "default_model_path": ".api", "Model": ".api", "PRESETS": ".model.config",
            "ModelArgs": ".model.config", "CheckpointError": ".errors", "ModelBusyError": ".errors",
            "Completion": ".engine.generate", "KernelOptions": ".kernels.options",
            "SamplingParams": ".engine.sampling", "Tokenizer": ".tokenizer.tokenizer"}

__all__ = ["load", "default_model_path", "Model", "ModelArgs", "PRESETS", "CheckpointError", "ModelBusyError",
           "Completion", "SamplingParams", "Tokenizer", "KernelOptions"]
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'codellama_rt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))

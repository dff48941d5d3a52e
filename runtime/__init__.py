"""codellama-rt: a lean, fast inference runtime for CodeLlama."""
from .api import Model, default_model_path, load
from .model.config import PRESETS, ModelArgs
from .errors import CheckpointError, ModelBusyError
from .engine.generate import Completion
from .kernels.options import KernelOptions
from .engine.sampling import SamplingParams
from .tokenizer.tokenizer import Tokenizer

__all__ = ["load", "default_model_path", "Model", "ModelArgs", "PRESETS", "CheckpointError", "ModelBusyError",
           "Completion", "SamplingParams", "Tokenizer", "KernelOptions"]
__version__ = "0.1.0"

"""codellama-rt: a lean, fast inference runtime for CodeLlama."""
from .api import Model, default_model_path, load
from .config import PRESETS, ModelArgs
from .errors import CheckpointError, ModelBusyError
from .generate import Completion
from .kernels.options import KernelOptions
from .sampling import SamplingParams
from .tokenizer import Tokenizer

__all__ = ["load", "default_model_path", "Model", "ModelArgs", "PRESETS", "CheckpointError", "ModelBusyError", "Completion", "SamplingParams", "Tokenizer", "KernelOptions"]
__version__ = "0.1.0"

"""codellama-rt without torch: the native CPU decode step (csrc/lite.cpp, the torch extension's DecoderCore built
as a plain C library) driven from numpy, for processes that must stay small. A process that imports only this
package and `codellama_rt.tokenizer` never imports torch (~220 MB of resident memory before any weight).

    codellama-rt export-lite --model DIR --out LITE_DIR [--quantize int8|int4]   # once, with torch
    python -m codellama_rt.lite LITE_DIR "def fib(n):" --max-new-tokens 64        # then without it

    from codellama_rt.lite import LiteModel
    LiteModel("LITE_DIR").generate("def fib(n):", max_new_tokens=64).text

The logits are bitwise those of the torch runtime's native decode step on the same weights (the same C++).
"""
from .file import FILE_NAME, LiteFile, read
from .model import LiteCompletion, LiteModel, LiteStream

__all__ = ["LiteModel", "LiteCompletion", "LiteStream", "LiteFile", "read", "FILE_NAME"]

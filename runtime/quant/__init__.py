"""Weight quantization: `QuantLinear` and quantizing a model's projections (`linear`). The packed formats and
their kernels live in `codellama_rt.kernels` (nf4, int4)."""

"""Checkpoints on disk: locating them and reading HF / Meta layouts (`loader`), the tensor files themselves
(`tensor_files`), and quantized checkpoints: bitsandbytes NF4, GPTQ int4 and our own format (`quantized`)."""

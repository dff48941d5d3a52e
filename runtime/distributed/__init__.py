"""Tensor parallelism over torch.distributed (`tensor_parallel.TensorParallel`)."""

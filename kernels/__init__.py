"""Compute kernels: one file per op, each with its PyTorch reference (`<op>_ref`).

The Triton kernels of each op join their reference in the same file; the runtime
reaches all of them through `codellama_rt.model.backends`.
"""

"""The ctypes binding of codellama_rt._cpu_lite (csrc/lite.cpp): the native decode step on numpy arrays."""
from __future__ import annotations

import ctypes
from typing import Optional

import numpy as np

from ..model.cpu_cache import one_row_int8
from .file import ALIGN, KINDS, LiteFile

_lib = None
_P = ctypes.c_void_p
_I = ctypes.c_int64
_ERR = 512
MAX_THREADS = 1024  # (as codellama_rt.api's: an OpenMP team past it fails inside libgomp)


def library() -> ctypes.CDLL:
    """The lite library, loaded once; RuntimeError saying how to get it where it was not built."""
    global _lib
    if _lib is None:
        try:
            from .. import _cpu_lite
        except ImportError as e:
            raise RuntimeError("codellama-rt's lite library (codellama_rt._cpu_lite) was not built: it needs a C++ "
                               "compiler with OpenMP when codellama-rt is installed (`bash scripts/setup.sh`, or "
                               f"`pip install -e .` where g++ is present) ({e})") from None
        lib = ctypes.CDLL(_cpu_lite.__file__)
        lib.clrt_isa.restype = ctypes.c_char_p
        lib.clrt_set_threads.argtypes, lib.clrt_set_threads.restype = [ctypes.c_int], ctypes.c_int
        lib.clrt_decoder_new.argtypes = [_I] * 6 + [ctypes.c_double, _P, _P, _I, _P, _P, _P, _I, _P, _I]
        lib.clrt_decoder_new.restype = _P
        lib.clrt_decoder_free.argtypes, lib.clrt_decoder_free.restype = [_P], None
        lib.clrt_decoder_add_linear.argtypes = [_P, _I, _P, _P, _P, _P, _I, _I, _I, ctypes.c_int, _P, _I]
        lib.clrt_decoder_one_row_int8.argtypes = [_P, ctypes.c_int]
        lib.clrt_decoder_bf16_prompt.argtypes = [_P, ctypes.c_int]
        lib.clrt_decoder_step.argtypes = [_P, _I, _P, _P, _P, _P, _I, _I, _P, _I, ctypes.c_int, _P, _I]
        _lib = lib
    return _lib


def isa() -> str:
    """The instruction set the library was built for: "avx512", "avx2" or "plain"."""
    return library().clrt_isa().decode()


def set_threads(n: Optional[int]) -> int:
    """Threads for the steps that follow (None: leave OpenMP's default, every core); returns the count in force."""
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_THREADS):
        raise ValueError(f"threads must be an int in 1..{MAX_THREADS}, got {n!r}")
    return library().clrt_set_threads(0 if n is None else n)


def aligned_zeros(shape: tuple, dtype=np.float32) -> np.ndarray:
    """np.zeros(shape, dtype) whose data starts on an ALIGN-byte boundary (numpy's large arrays start 16 bytes past
    one, and the kernels' 64-byte loads of K / V rows then straddle two cache lines); zero pages, as np.zeros."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.zeros(nbytes + ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _ptr(a: Optional[np.ndarray]) -> Optional[int]:
    return None if a is None else a.ctypes.data


class NativeDecoder:
    """A native decoder over a LiteFile's arrays (kept alive here, as the library only points into them).
    bf16_prompt: prompt rows of int8 / int4 / NF4 weights multiply in bf16 (activations and weights rounded to
    bf16, fp32 sums) where the CPU has AVX512-BF16, as the torch runtime's cpu_bf16_prefill; `bf16_prompt` then
    says whether they do."""

    def __init__(self, lite: LiteFile, path: str = "lite model", *, bf16_prompt: bool = True):
        c, a = lite.config, lite.arrays
        lib = library()
        self._lib, self.config = lib, c
        self.layers, self.vocab_size = c["layers"], c["vocab_size"]
        self.n_kv_heads, self.head_dim = c["n_kv_heads"], c["head_dim"]
        dims = (c["dim"], c["n_heads"], c["n_kv_heads"], c["head_dim"], c["ffn_dim"], c["vocab_size"])
        _check(a, "embedding", np.float32, (c["vocab_size"], c["dim"]), path)
        _check(a, "final_norm", np.float32, (c["dim"],), path)
        norms = [_check(a, f"norm.{i}", np.float32, (c["dim"],), path) for i in range(2 * self.layers)]
        cos = _check(a, "rope_cos", np.float32, (None, c["head_dim"] // 2), path)
        _check(a, "rope_sin", np.float32, cos.shape, path)
        self._keep = list(a.values())
        self._norm_ptrs = (ctypes.c_void_p * len(norms))(*[_ptr(t) for t in norms])
        err = ctypes.create_string_buffer(_ERR)
        self._d = lib.clrt_decoder_new(*dims, float(c["norm_eps"]), _ptr(a["embedding"]), self._norm_ptrs,
                                       len(norms), _ptr(a["final_norm"]), _ptr(cos), _ptr(a["rope_sin"]),
                                       cos.shape[0], err, _ERR)
        if not self._d:
            raise ValueError(f"{path}: {err.value.decode()}")
        weight_bytes, has_int8 = 0, False
        shapes = _projection_shapes(c)
        if len(c["projections"]) != len(shapes):
            raise ValueError(f"{path}: {len(c['projections'])} projections for {self.layers} layers (expected "
                             f"{len(shapes)}: wqkv, wo, w13, w2 per layer, then the lm_head)")
        for j, (parts, (width, depth)) in enumerate(zip(c["projections"], shapes)):
            if not isinstance(parts, list) or not parts:
                raise ValueError(f"{path}: projection {j}: a non-empty list of parts expected, got {parts!r}")
            for i, p in enumerate(parts):
                name = f"proj.{j}.{i}"
                if not isinstance(p, dict):
                    raise ValueError(f"{path}: {name}: a part is a JSON object, got {p!r}")
                kind = KINDS.get(p.get("kind"))
                if kind is None:
                    raise ValueError(f"{path}: {name}: unknown weight kind {p.get('kind')!r}")
                w, scale, zs, levels = (a.get(f"{name}.{s}") for s in ("w", "scale", "zs", "levels"))
                _check_part(name, kind, p, w, scale, zs, levels, path)
                if p["K"] != depth or (i == len(parts) - 1 and sum(q["N"] for q in parts) != width):
                    raise ValueError(f"{path}: projection {j}: parts of {[(q.get('N'), q.get('K')) for q in parts]} "
                                     f"(N, K) do not make the model's [{width}, {depth}]")
                if lib.clrt_decoder_add_linear(self._d, kind, _ptr(w), _ptr(scale), _ptr(zs), _ptr(levels), p["N"],
                                               p["K"], p["group"], int(i > 0), err, _ERR):
                    raise ValueError(f"{path}: {name}: {err.value.decode()}")
                weight_bytes += sum(t.nbytes for t in (w, scale, zs) if t is not None)
                has_int8 |= kind == KINDS["int8"]
        lib.clrt_decoder_one_row_int8(self._d, int(one_row_int8(isa(), has_int8, weight_bytes)))
        self.bf16_prompt = bool(lib.clrt_decoder_bf16_prompt(self._d, int(bf16_prompt)))
        self.rope_positions = cos.shape[0]
        self._err = err
        # decode_one's buffers, their addresses taken once (a numpy array's address costs ~2 us to ask)
        self._one = np.zeros(2, dtype=np.int64)  # (token, position)
        self._one_logits = np.empty((1, self.vocab_size), dtype=np.float32)
        self._one_p, self._one_logits_p = _ptr(self._one), _ptr(self._one_logits)
        self._one_cache, self._one_cache_p = None, None

    def __del__(self):
        if getattr(self, "_d", None):
            self._lib.clrt_decoder_free(self._d)
            self._d = None

    def new_cache(self, rows: int, positions: int) -> np.ndarray:
        """A KV cache fp32 [layers, 2, rows, n_kv_heads, positions, head_dim] (zero pages: memory as it is
        written)."""
        return aligned_zeros((self.layers, 2, rows, self.n_kv_heads, positions, self.head_dim))

    def decode_one(self, token: int, position: int, cache: np.ndarray) -> np.ndarray:
        """step of one token at cache row 0 -> logits fp32 [vocab], a view of a buffer that the next call
        overwrites (the per-token path: no array made or address asked per call)."""
        if cache is not self._one_cache:
            self._check_cache(cache)
            self._one_cache, self._one_cache_p = cache, _ptr(cache)
        self._one[0], self._one[1] = token, position
        if self._lib.clrt_decoder_step(self._d, 1, self._one_p, self._one_p + 8, None, self._one_cache_p,
                                       cache.shape[2], cache.shape[4], self._one_logits_p, 1, 0, self._err, _ERR):
            raise ValueError(self._err.value.decode())
        return self._one_logits[0]

    def _check_cache(self, cache: np.ndarray) -> None:
        if (cache.dtype != np.float32 or cache.ndim != 6 or not cache.flags.c_contiguous or not cache.flags.writeable
                or cache.shape[0] != self.layers or cache.shape[1] != 2 or cache.shape[3] != self.n_kv_heads
                or cache.shape[5] != self.head_dim):
            raise ValueError(f"cache must be a writable contiguous fp32 array [{self.layers}, 2, rows, "
                             f"{self.n_kv_heads}, positions, {self.head_dim}] (new_cache)")

    def step(self, tokens: np.ndarray, positions: np.ndarray, cache: np.ndarray, slots: Optional[np.ndarray] = None,
             out_rows: Optional[int] = None, prompt: bool = False) -> np.ndarray:
        """The decode step: tokens, positions, slots int64 [B] (slots None: row b at cache row b), cache from
        new_cache (written at the positions) -> logits fp32 [out_rows, vocab] of the last out_rows rows (default
        all). Rows of one slot at consecutive positions attend causally (a prompt, a verify block). prompt: the
        rows are a prompt's, their projections a packed GEMM (another summation order: logits within fp32 rounding
        of, not bitwise, a decode step's)."""
        B = tokens.shape[0]
        out_rows = B if out_rows is None else out_rows
        for name, t in (("tokens", tokens), ("positions", positions), ("slots", slots)):
            if t is not None and (t.dtype != np.int64 or t.shape != (B,) or not t.flags.c_contiguous):
                raise ValueError(f"{name} must be a contiguous int64 array of shape ({B},)")
        self._check_cache(cache)
        logits = np.empty((out_rows, self.vocab_size), dtype=np.float32)
        if self._lib.clrt_decoder_step(self._d, B, _ptr(tokens), _ptr(positions), _ptr(slots), _ptr(cache),
                                       cache.shape[2], cache.shape[4], _ptr(logits), out_rows, int(prompt), self._err,
                                       _ERR):
            raise ValueError(self._err.value.decode())
        return logits


def _check(arrays: dict, name: str, dtype, shape: tuple, path: str) -> np.ndarray:
    t = arrays.get(name)
    if t is None:
        raise ValueError(f"{path}: tensor '{name}' missing")
    if t.dtype != dtype or t.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        raise ValueError(f"{path}: tensor '{name}' is {t.dtype} {tuple(t.shape)}, expected {np.dtype(dtype)} "
                         f"{tuple('*' if s is None else s for s in shape)}")
    return t


def _projection_shapes(c: dict) -> list:
    """(N, K) of every projection the config's dims give: per layer wqkv, wo, w13, w2, then the lm_head."""
    q, kv = c["n_heads"] * c["head_dim"], c["n_kv_heads"] * c["head_dim"]
    layer = [(q + 2 * kv, c["dim"]), (c["dim"], q), (2 * c["ffn_dim"], c["dim"]), (c["dim"], c["ffn_dim"])]
    return layer * c["layers"] + [(c["vocab_size"], c["dim"])]


def _check_part(name, kind, p, w, scale, zs, levels, path) -> None:
    """A part's arrays against its kind's layout (csrc/cpu_linear_base.h's Linear), before the library reads them;
    where the config lists the part's tensors (`tensors`), each of them present."""
    if not all(isinstance(p.get(key), int) and not isinstance(p.get(key), bool) for key in ("N", "K", "group")):
        raise ValueError(f"{path}: {name}: N, K and group must be integers, got {p!r}")
    listed = p.get("tensors")
    if listed is not None:
        if not isinstance(listed, list) or not set(listed) <= {"w", "scale", "zs", "levels"}:
            raise ValueError(f"{path}: {name}: tensors must list some of w, scale, zs, levels, got {listed!r}")
        given = {"w": w, "scale": scale, "zs": zs, "levels": levels}
        for suffix, t in given.items():
            if (t is None) == (suffix in listed):
                raise ValueError(f"{path}: tensor '{name}.{suffix}' " + ("missing" if t is None else
                                 "is not one the config lists for this part"))
    n, k, g = p["N"], p["K"], p["group"]
    if kind == KINDS["dense"]:
        expect = {"w": (np.float32, (n, k))}
    elif kind in (KINDS["int8"], KINDS["int8_x16"]):
        expect = {"w": (np.int8, (n, k)), "scale": (np.float32, (n,))}
    else:
        if g <= 0 or k % g:
            raise ValueError(f"{path}: {name}: group {g} does not divide K = {k}")
        expect = {"w": (np.uint8, (n, k // 2)), "scale": (np.float32, (n, k // g))}
        if zs is not None:
            expect["zs"] = (np.float32, (n, k // g))
        if levels is not None:
            expect["levels"] = (np.float32, (16,))
    given = {"w": w, "scale": scale, "zs": zs, "levels": levels}
    for suffix, (dtype, shape) in expect.items():
        _check(given, suffix, dtype, shape, f"{path}: {name}")
    for suffix, t in given.items():
        if t is not None and suffix not in expect:
            raise ValueError(f"{path}: {name}: a {p['kind']} weight has no '{suffix}'")

"""A small emulator of the PTX the fragment-order kernels inline (`int4_frag.FRAG_ASM`,
`nf4_frag.NF4_LOOKUP_ASM`), over numpy arrays with one element per thread: lop3.b32 (any LUT), shr.u32,
shl.b32, add.u32, prmt.b32 (default mode), mov.u32 from %laneid or global_smem, and ld.shared.b32 from a
given shared-memory image. An instruction it does not know fails the test that runs it."""
from __future__ import annotations

import numpy as np

_MASK32 = np.uint64(0xFFFFFFFF)


def _prmt(a: np.ndarray, b: np.ndarray, selector: int) -> np.ndarray:
    """prmt.b32 d, a, b, c (default mode): byte i of d is byte (c >> 4 i) & 7 of {b, a} (0..3 from a, 4..7
    from b), replaced by its sign bit in all 8 bits where bit 3 of that nibble is set."""
    source = (a & _MASK32) | ((b & _MASK32) << np.uint64(32))
    out = np.zeros_like(source)
    for i in range(4):
        nibble = (selector >> (4 * i)) & 0xF
        byte = (source >> np.uint64(8 * (nibble & 7))) & np.uint64(0xFF)
        if nibble & 8:
            byte = np.where(byte & np.uint64(0x80), np.uint64(0xFF), np.uint64(0))
        out |= byte << np.uint64(8 * i)
    return out


def run_ptx(asm: str, inputs: list[np.ndarray], outputs: int, *, lane: np.ndarray | None = None,
            shared: np.ndarray | None = None, shared_base: int = 0) -> list[np.ndarray]:
    """Run `asm` once per element: $k for k < outputs are the outputs (uint32), $outputs.. the inputs.
    lane: each element's %laneid; shared: the shared memory as uint8 bytes, `global_smem` at shared_base."""
    n = inputs[0].shape
    regs = {f"${outputs + i}": np.asarray(x).astype(np.uint64) & _MASK32 for i, x in enumerate(inputs)}

    def val(tok):
        tok = tok.strip()
        if tok[0].isdigit():
            return np.full(n, np.uint64(int(tok, 0)))
        if tok == "%laneid":
            return np.broadcast_to(np.asarray(lane, dtype=np.uint64), n)
        if tok == "global_smem":
            return np.full(n, np.uint64(shared_base))
        return regs[tok]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        args = [a.strip() for a in rest.split(",")]
        if op == "lop3.b32":
            a, b, c, lut = val(args[1]), val(args[2]), val(args[3]), int(args[4], 0)
            out = np.zeros(n, dtype=np.uint64)
            for index in range(8):  # minterm index = 4 a + 2 b + c (PTX: ta = 0xF0, tb = 0xCC, tc = 0xAA)
                if lut >> index & 1:
                    ta = a if index & 4 else ~a & _MASK32
                    tb = b if index & 2 else ~b & _MASK32
                    tc = c if index & 1 else ~c & _MASK32
                    out |= ta & tb & tc
            regs[args[0]] = out & _MASK32
        elif op == "shr.u32":
            regs[args[0]] = (val(args[1]) >> np.uint64(int(args[2], 0))) & _MASK32
        elif op == "shl.b32":
            regs[args[0]] = (val(args[1]) << np.uint64(int(args[2], 0))) & _MASK32
        elif op == "add.u32":
            regs[args[0]] = (val(args[1]) + val(args[2])) & _MASK32
        elif op == "mov.u32":
            regs[args[0]] = val(args[1]) & _MASK32
        elif op == "prmt.b32":
            regs[args[0]] = _prmt(val(args[1]), val(args[2]), int(args[3], 0))
        elif op == "ld.shared.b32":
            address = val(args[1].strip("[]")).astype(np.int64) - shared_base
            if (address % 4).any() or (address < 0).any() or (address + 4 > shared.size).any():
                raise AssertionError("ld.shared.b32 outside the shared memory or not 4-byte aligned")
            words = shared.view(np.uint32)
            regs[args[0]] = words[address // 4].astype(np.uint64)
        else:
            raise AssertionError(f"the emulator does not know {op!r}: extend it with the new instruction")
    return [regs[f"${k}"].astype(np.uint32) for k in range(outputs)]

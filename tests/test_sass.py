"""`kernels.sass`, the static main-loop table of the 4-bit kernels: its SASS parsing on a known snippet, the
occupancy arithmetic, and on the compiled int4 decode GEMV (7B wqkv, sm_90) the count an earlier session
made by hand from ptxas' output (int4_gemv.py: 4.7 SASS instructions a weight in the M = 1 loop)."""
from __future__ import annotations

import pytest

from codellama_rt.kernels import sass

SNIPPET = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.U16 R8, desc[UR4][R6.64] ;
.L_x_1:
        /*0030*/                   FFMA R9, R4, R8, R9 ;
        /*0040*/              @P1 BRA `(.L_x_1) ;
        /*0050*/                   LDG.E R10, desc[UR4][R2.64+0x10] ;
        /*0060*/              @P0 BRA `(.L_x_0) ;
        /*0070*/                   EXIT ;
.L_x_2:
        /*0080*/                   BRA `(.L_x_2);
"""


def test_main_loop_is_the_widest_backward_branch_and_loads_are_summed():
    loop = sass.main_loop(SNIPPET.splitlines())
    assert loop[0].startswith("LDG.E.128") and loop[-1].endswith("BRA `(.L_x_0)") and len(loop) == 6
    assert sass.load_bytes(loop) == 16 + 2 + 4
    assert sass.main_loop(["        /*0000*/                   EXIT ;"]) == []


def test_ctas_per_sm():
    assert sass.ctas_per_sm(registers=32, num_warps=4, shared_bytes=0, arch=90) == 16  # 64 warps / 4
    assert sass.ctas_per_sm(registers=255, num_warps=4, shared_bytes=0, arch=90) == 2  # 65536 / (256*32*4)
    assert sass.ctas_per_sm(registers=32, num_warps=1, shared_bytes=0, arch=90) == 32
    assert sass.ctas_per_sm(registers=32, num_warps=4, shared_bytes=100 * 1024, arch=90) == 2


def test_int4_decode_gemv_loop_matches_the_hand_count():
    from codellama_rt.bench.common import aot_models

    [cfg] = [c for c in sass.four_bit_configs(aot_models()[:1])
             if c.label.startswith("bf16 M=1 1x256x128 partials (7B wqkv")]
    stats = sass.loop_stats(cfg, 90)
    assert stats.weights_per_thread == 128 * 256 / 128
    assert stats.per_weight == pytest.approx(4.7, abs=0.15)
    assert stats.load_bytes_per_thread >= 16 * 256 * 4 / 128  # at least its share of the packed weights
    assert "| _int4_gemv_kernel |" in sass.format_table([stats])

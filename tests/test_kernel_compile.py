"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 at the configurations its launcher
uses (7B/34B/70B shapes), without register spills and within the card's shared memory."""
from __future__ import annotations

import pytest

from codellama_rt.kernels import aot
from codellama_rt.bench.common import aot_models


@pytest.fixture(scope="module")
def table():
    return aot.resource_table(aot_models())


def test_every_kernel_module_has_configs_for_both_archs(table):
    kernels = {r.kernel for r in table}
    assert len(kernels) >= len(aot.KERNEL_MODULES)
    for k in kernels:
        assert {r.arch for r in table if r.kernel == k} == set(aot.ARCHS), k


def test_no_spills_and_shared_memory_within_limits(table):
    print("\n" + aot.format_table(table))
    assert aot.problems(table) == []
    assert all(r.registers > 0 for r in table)


def test_decode_kernels_use_pdl_on_hopper_only():
    """Every kernel a decode step launches takes part in programmatic dependent launch: on sm_90 its code
    lets the next kernel launch and waits for the previous one (griddepcontrol) before touching memory;
    on sm_80, which has no such instructions, neither."""
    from codellama_rt.kernels._triton import compile_kernel

    configs = {c.kernel.__name__: c for c in aot.all_configs(aot_models()) if c.kernel.has_pdl}
    assert set(configs) >= {"_gemv_kernel", "_rms_norm_kernel", "_rotary_kernel",
                            "_decode_split_kernel", "_decode_reduce_kernel", "_swiglu_kernel",
                            "_int4_gemv_kernel", "_int4_splitk_reduce_kernel"}, sorted(configs)
    for name, cfg in configs.items():
        ptx90 = compile_kernel(cfg, 90).asm["ptx"]
        wait, launch = ptx90.find("griddepcontrol.wait"), ptx90.find("griddepcontrol.launch_dependents")
        assert 0 <= launch < wait, name
        first_access = min(i for i in (ptx90.find("ld.global"), ptx90.find("st.global")) if i >= 0)
        assert wait < first_access, f"{name}: a global access before griddepcontrol.wait"
        assert "griddepcontrol" not in compile_kernel(cfg, 80).asm["ptx"], name


def test_tickets_buffer_grows_and_keeps_the_old_one():
    import torch

    from codellama_rt.kernels import _triton as mod

    dev = torch.device("cpu")
    small = mod.tickets(dev, 4)
    assert small.dtype == torch.int32 and (small == 0).all() and mod.tickets(dev, 8).data_ptr() == small.data_ptr()
    big = mod.tickets(dev, 100_000)
    assert big.numel() == 100_000 and (big == 0).all() and big.data_ptr() != small.data_ptr()
    assert any(t.data_ptr() == small.data_ptr() for t in mod._OUTGROWN)  # a captured graph may still use it


def test_host_integer_helpers_match_triton():
    import triton

    from codellama_rt.kernels._triton import cdiv, next_power_of_2

    for a in list(range(0, 70)) + [4095, 4096, 4097, 11008, 12288, 2 ** 31 - 1]:
        assert next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in (1, 2, 3, 7, 16, 64, 128, 256, 1000):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)

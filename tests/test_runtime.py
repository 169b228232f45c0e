"""Run-time plumbing: the device choice and what the CPU can do."""

from __future__ import annotations

import pytest
import torch

from s2l_core.runtime import cpu_bf16_native, pick_device

INTEL = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 avx512f {}\n\n"


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("avx512_bf16 avx512_vnni", True),  # e.g. AMD Zen 4, Intel Cooper Lake
        ("amx_tile amx_bf16", True),  # e.g. Intel Sapphire Rapids
        ("avx512bw avx512_vnni", False),  # AVX-512 without bfloat16: emulated, slow
        ("", False),
    ],
)
def test_cpu_bf16_native_reads_the_flags(flags, native):
    assert cpu_bf16_native(INTEL.format(flags)) is native


def test_cpu_bf16_native_needs_the_flags_line():
    assert cpu_bf16_native("") is False  # no /proc/cpuinfo (macOS, Windows)
    assert cpu_bf16_native("model name\t: avx512_bf16 in a name\n") is False
    assert cpu_bf16_native("vmx flags\t: avx512_bf16\n") is False  # another line's flags
    assert isinstance(cpu_bf16_native(), bool)  # this machine's, whatever it is


def test_pick_device_says_what_it_chose(capsys):
    assert pick_device("cpu") == torch.device("cpu")
    assert "Using the CPU" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert pick_device("auto", verbose=False).type == "cpu"
        with pytest.raises(RuntimeError, match="no CUDA device"):
            pick_device("cuda")

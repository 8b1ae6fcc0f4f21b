"""llama.cpp's extra (repacked) weight buffers are turned off only where its AMX kernel is
built in: that kernel's matmul segfaults on the engine's batches."""

from services.model.llama_engine import extra_buffers_safe

AVX2_ONLY = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | "
             "BMI2 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")
SAPPHIRE_RAPIDS = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | "
                   "AVX512 = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | "
                   "LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")


def test_a_cpu_without_amx_keeps_the_repacked_weights():
    assert extra_buffers_safe(AVX2_ONLY)


def test_a_cpu_with_amx_uses_the_plain_kernels():
    assert not extra_buffers_safe(SAPPHIRE_RAPIDS)

"""The CPU serving defaults follow the CPU: bf16 only where oneDNN can build its matmul (AVX-512)."""

from armor_vllm.serve import AVX512_CORE, CPU_DEFAULT_ARGS, VllmServer, cpu_default_args


def test_float32_without_avx512():
    assert cpu_default_args(frozenset({"avx", "avx2", "fma"})) == (*CPU_DEFAULT_ARGS, "--dtype", "float32")
    # one AVX-512 subset missing is not enough for oneDNN's avx512_core level
    assert "--dtype" in cpu_default_args(AVX512_CORE - {"avx512bw"})


def test_model_dtype_with_avx512():
    assert cpu_default_args(AVX512_CORE | {"avx2", "amx_bf16"}) == CPU_DEFAULT_ARGS


def test_server_uses_the_cpu_defaults_unless_given_arguments(tmp_path):
    assert VllmServer(tmp_path).extra_args == list(cpu_default_args())
    assert VllmServer(tmp_path, extra_args=("--max-model-len", "64")).extra_args == ["--max-model-len", "64"]

"""Device settings that contradict each other are refused when the settings are read, in one line each."""

import pytest
from pydantic import ValidationError

from server.core.config import Settings, settings_errors


def refusal(monkeypatch: pytest.MonkeyPatch, **env: str) -> list[str]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as raised:
        Settings(_env_file=None)
    return settings_errors(raised.value)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DEVICE": "cuda", "GENERATOR_PRECISION": "int8"}, "GENERATOR_PRECISION=int8 runs on the CPU only"),
        ({"DEVICE": "cuda:1", "SENTIMENT_PRECISION": "int8"}, "SENTIMENT_PRECISION=int8 runs on the CPU only"),
        ({"DEVICE": "cuda", "GENERATOR_FP32_KERNELS": "onednn"}, "GENERATOR_FP32_KERNELS=onednn is a CPU path"),
        ({"DEVICE": "cpu", "SENTIMENT_DTYPE": "float16"}, "SENTIMENT_DTYPE=float16 is refused on the CPU"),
        (
            {"GENERATOR_DTYPE": "bfloat16", "GENERATOR_PRECISION": "int8"},
            "GENERATOR_PRECISION=int8 quantizes float32 weights",
        ),
        (
            {"SENTIMENT_DTYPE": "bfloat16", "SENTIMENT_FP32_KERNELS": "onednn"},
            "SENTIMENT_FP32_KERNELS=onednn packs float32 weights",
        ),
    ],
)
def test_a_setting_for_the_other_device_is_refused_in_one_line(monkeypatch, env, expected):
    [line] = refusal(monkeypatch, **env)
    assert line.startswith(f"invalid settings: {expected}") and "\n" not in line


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "CUDA"])
def test_a_device_is_auto_cpu_cuda_or_cuda_n(monkeypatch, value):
    [line] = refusal(monkeypatch, DEVICE=value)
    assert line == f"invalid setting DEVICE={value!r}: expected auto, cpu, cuda or cuda:N"


def test_the_defaults_leave_the_choice_to_the_machine(monkeypatch):
    for name in ("DEVICE", "GENERATOR_DTYPE", "GENERATOR_FP32_KERNELS", "SCHEDULER_MAX_SIZE"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=None)
    assert (settings.device, settings.generator_dtype, settings.generator_fp32_kernels) == ("auto", "auto", "auto")
    assert settings.scheduler_max_size is None


def test_cuda_settings_that_fit_are_accepted(monkeypatch):
    monkeypatch.setenv("DEVICE", "cuda:0")
    monkeypatch.setenv("GENERATOR_DTYPE", "float16")
    monkeypatch.setenv("GENERATOR_FP32_KERNELS", "torch")
    assert Settings(_env_file=None).generator_dtype == "float16"

"""``armor_vllm.envs``: one prefix for every variable; the older names still read, with a warning."""

import pytest

from armor_vllm import envs
from armor_vllm.kernels import FactoredKernel


def test_new_names_are_read(monkeypatch):
    monkeypatch.setenv("ARMOR_VLLM_DENSE_BELOW", "4")
    monkeypatch.setenv("ARMOR_VLLM_WRAPPER", "bmm")
    kernel = FactoredKernel()
    assert kernel.dense_below == 4 and kernel.wrapper == "bmm"


def test_old_names_still_work_with_a_deprecation_warning(monkeypatch):
    monkeypatch.delenv("ARMOR_VLLM_DENSE_BELOW", raising=False)
    monkeypatch.setenv("ARMOR_DENSE_BELOW", "0")
    with pytest.warns(DeprecationWarning, match=r"\$ARMOR_DENSE_BELOW is deprecated; use \$ARMOR_VLLM_DENSE_BELOW"):
        assert FactoredKernel().dense_below == 0


def test_the_new_name_wins_and_bad_values_name_the_variable(monkeypatch):
    monkeypatch.setenv("ARMOR_DENSE_BELOW", "7")
    monkeypatch.setenv("ARMOR_VLLM_DENSE_BELOW", "2")
    assert envs.get_int(envs.DENSE_BELOW) == 2
    monkeypatch.setenv("ARMOR_VLLM_DENSE_BELOW", "many")
    with pytest.raises(ValueError, match=r"\$ARMOR_VLLM_DENSE_BELOW='many' is not an integer"):
        envs.get_int(envs.DENSE_BELOW)

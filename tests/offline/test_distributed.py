"""The offline pass with the groups compressed as Ray tasks writes the same bytes as one process."""

import hashlib
import sys

import pytest

from armor_vllm.offline import distributed
from armor_vllm.offline.__main__ import main as offline_main
from armor_vllm.offline.pipeline import OfflineOptions, run_offline

SMALL = dict(calib_samples=4, seq_len=64)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (2 CPUs); the executor reuses an initialised Ray."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize(
    "method, method_options",
    [("wanda", {}), ("armor", {"preset": "quick", "iterations": 1})],
)
def test_ray_workers_write_the_single_process_bytes(local_ray, tiny_model_dir, tmp_path, method, method_options):
    opts = dict(model=str(tiny_model_dir), method=method, block_size=32, method_options=method_options, **SMALL)
    single = tmp_path / "single"
    run_offline(OfflineOptions(output=str(single), **opts))
    spread = tmp_path / "ray"
    run_offline(OfflineOptions(output=str(spread), workers=2, **opts))
    assert local_ray.is_initialized(), "an executor must not shut down a Ray it did not start"
    assert sha(spread / "model.safetensors") == sha(single / "model.safetensors")


def test_workers_and_ray_address_do_not_change_the_fingerprint():
    base = OfflineOptions(model="m", output="o", method="armor")
    assert base.fingerprint() == OfflineOptions(model="m", output="o", method="armor", workers=4).fingerprint()
    assert base.fingerprint() == OfflineOptions(model="m", output="o", method="armor", ray_address="auto").fingerprint()


def test_cli_without_ray_says_how_to_install_it(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert (
        offline_main(
            ["--model", str(tiny_model_dir), "--output", str(tmp_path / "x"), "--method", "magnitude", "--workers", "2"]
        )
        == 2
    )
    assert "pip install 'armor-vllm[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_bad_executor_options_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        distributed.make_executor(workers=0)
    with pytest.raises(ValueError, match="not both"):
        distributed.make_executor(workers=2, ray_address="auto")
    assert isinstance(distributed.make_executor(), distributed.LocalExecutor)

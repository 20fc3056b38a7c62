import os
from pathlib import Path

import pytest
import torch

import fastgrad  # noqa: F401  (registers the ops and backends)
from fastgrad.data import load_default_corpus

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fastgrad_cache(tmp_path_factory, monkeypatch):
    """Tests never touch the user's real cache directory."""
    if "FASTGRAD_CACHE" not in os.environ:
        monkeypatch.setenv("FASTGRAD_CACHE", str(tmp_path_factory.getbasetemp() / "fastgrad-cache"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """200 000 characters of the bundled corpus, for the tests that run ``fastgrad pretrain``."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(load_default_corpus()[:200_000])
    return path


def assert_close_report(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """Relative Frobenius error check that says where and by how much the tensors differ."""
    err = (actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30)
    if err > rtol:
        diff = (actual.float() - expected.float()).abs()
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{what}: relative error {err:.3e} > {rtol:.1e}; worst at {idx}: "
            f"{actual.float()[idx]:.6g} vs {expected.float()[idx]:.6g}"
        )


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny matrices: on a loaded 2-core machine a second thread only adds OpenMP
    spin-waits (it made the optimizer tests ten times slower). Use with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

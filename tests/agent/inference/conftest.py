"""Fixtures for the inference tests: tiny models built here, data, a blob server, a manager."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from lepton.agent.inference.manager import ModelManager
from lepton.agent.inference.served import deploy_spec
from lepton.protocol.tasks import DeployParams
from tests.support.httpserver import HttpServer

REPO = Path(__file__).resolve().parents[3]
ARTIFACTS = REPO / "lepton" / "models" / "artifacts"


def linear_onnx(
    w: npt.NDArray[np.float32], b: npt.NDArray[np.float32], *, batch: int | None = None
) -> bytes:
    """An ONNX model ``logits = x @ w + b`` for ``w`` of shape (in, out)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n_in, n_out = w.shape
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch or "N", n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch or "N", n_out])],
        initializer=[
            numpy_helper.from_array(w.astype(np.float32), "w"),
            numpy_helper.from_array(b.astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


@dataclass(frozen=True)
class Linear:
    """A linear classifier and data it labels perfectly."""

    w: npt.NDArray[np.float32]
    b: npt.NDArray[np.float32]
    onnx: bytes
    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]

    def logits(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return x @ self.w + self.b


def make_linear(seed: int, n_in: int = 16, n_out: int = 4, n: int = 500) -> Linear:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n_in, n_out)).astype(np.float32)
    b = rng.normal(size=n_out).astype(np.float32)
    x = rng.uniform(-1, 1, size=(n, n_in)).astype(np.float32)
    y = (x @ w + b).argmax(axis=1).astype(np.int64)
    return Linear(w=w, b=b, onnx=linear_onnx(w, b), x=x, y=y)


@pytest.fixture(scope="session")
def linear() -> Linear:
    return make_linear(1)


@pytest.fixture(scope="session")
def big() -> Linear:
    """A model of ~130 kB, so transfers take several reads."""
    return make_linear(3, n_in=512, n_out=64, n=50)


@pytest.fixture(scope="session")
def other_linear() -> Linear:
    """A second model with the same input, for swaps."""
    return make_linear(2)


@pytest.fixture
def blobs() -> Iterator[HttpServer]:
    with HttpServer() as server:
        yield server


@pytest.fixture
def manager(tmp_path: Path) -> ModelManager:
    return ModelManager(
        tmp_path / "models", threads=1, retries=3, timeout=5.0, backoff=(0.01, 0.05)
    )


@pytest.fixture
async def served(manager: ModelManager, blobs: HttpServer, linear: Linear) -> ModelManager:
    """A manager serving the ``linear`` model as ``clf``."""
    await manager.deploy(spec_for(blobs, linear.onnx))
    return manager


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (their paths are limited to ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="lep-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def spec_for(
    blobs: HttpServer, data: bytes, name: str = "clf", fmt: str = "onnx", **extra: object
) -> DeployParams:
    digest = blobs.add(data)
    params = {"name": name, "digest": digest, "size": len(data), "url": blobs.url(digest)}
    params.update({"format": fmt, "precision": "fp32", **extra})
    return deploy_spec(params, max_bytes=1 << 30)


def artifact(pattern: str) -> Path:
    found = sorted(ARTIFACTS.glob(pattern))
    if not found:
        pytest.skip(f"no shipped artifact models/artifacts/{pattern} in this checkout")
    return found[0]

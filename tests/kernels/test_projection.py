"""kernels/projection.py against float64 GEMMs.

Under Triton's interpreter, tests/tensor_cores.py makes its TF32 dots round as tensor cores do, so
the accuracy of ``tf32x3`` and the coarseness of ``tf32`` are checked here as on a GPU.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from crossattn_gpu.backends.triton_backend import interpreter_mode  # noqa: E402
from crossattn_gpu.kernels.projection import launch_config, matmul  # noqa: E402

if not interpreter_mode() and not torch.cuda.is_available():
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not set", allow_module_level=True)

DEVICE = "cpu" if interpreter_mode() else "cuda"

#: (M, K, N): one element, odd sizes that fill no tile, K past one block, full tiles (the EVEN paths), and
#: full tiles on two of the three axes (each EVEN flag alone decides a load or the store).
SHAPES = [(1, 1, 1), (3, 17, 5), (113, 130, 17), (257, 40, 300), (128, 64, 128), (130, 1280, 36), (128, 40, 64),
          (128, 64, 36), (100, 64, 64)]


def relative_error(got, want) -> float:
    got = got.double().cpu().numpy()
    assert np.isfinite(got).all()
    return float(np.abs(got - want).max() / np.abs(want).max())


def operands(rows, depth, cols, seed=0):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((rows, depth)), rng.standard_normal((depth, cols))
    ta, tb = (torch.tensor(x, dtype=torch.float32, device=DEVICE) for x in (a, b))
    # The reference multiplies the float32-rounded operands, so only the GEMM's own error counts.
    want = ta.double().cpu().numpy() @ tb.double().cpu().numpy()
    return ta, tb, want


def sequential_float32(ta, tb) -> np.ndarray:
    """The textbook float32 GEMM: one running float32 sum per output, the products added in order of
    k, as a tiled GEMM adds them. cuBLAS and OpenBLAS split their sums and can do better: on an H200,
    cuBLAS had 2x to 6x less error than this kernel's IEEE path at K = 17 to 1280 (NumPy here: the
    same at K <= 130, 2.8x less at 1280)."""
    a, b = ta.cpu().numpy(), tb.cpu().numpy()
    total = np.zeros((a.shape[0], b.shape[1]), np.float32)
    for k in range(a.shape[1]):
        total += np.outer(a[:, k], b[k])
    return total


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_float32_accuracy(shape, precision):
    """IEEE and tf32x3 within twice the error of a plain float32 GEMM (the worst of torch's, NumPy's
    and a sequential sum, whose orders of summation differ), plus a few float32 ulps for tf32x3: its
    dropped product of remainders is up to 2**-22 of a product where a float32 product is exact."""
    ta, tb, want = operands(*shape)
    got = matmul(ta, tb, precision=precision)
    assert got.shape == (shape[0], shape[2]) and got.dtype == torch.float32 and got.is_contiguous()
    numpy_product = ta.cpu().numpy() @ tb.cpu().numpy()
    plain = max(relative_error(product, want) for product in
                (ta @ tb, torch.from_numpy(numpy_product), torch.from_numpy(sequential_float32(ta, tb))))
    assert relative_error(got, want) <= 2 * plain + (8 * 2.0**-24 if precision == "tf32x3" else 1e-12)


def test_tf32_is_one_tensor_core_product():
    """One TF32 product keeps 11 bits of each operand: an error near 1e-3, far above tf32x3's."""
    ta, tb, want = operands(70, 300, 45)
    tf32 = relative_error(matmul(ta, tb, precision="tf32"), want)
    tf32x3 = relative_error(matmul(ta, tb, precision="tf32x3"), want)
    assert 1e-5 < tf32 < 1e-2
    assert tf32x3 < tf32 / 100


def test_any_strides():
    """Column views of a wider matrix (the folded weights' query half) and a transposed left operand."""
    ta, tb, _ = operands(40, 24, 96, seed=1)
    wide = torch.cat([tb, tb * 2], dim=1)
    left = ta.t().contiguous().t()  # column-major (40, 24)
    got = matmul(left, wide[:, 96:], precision="tf32x3")
    torch.testing.assert_close(got, matmul(ta, (tb * 2).contiguous(), precision="tf32x3"), rtol=0, atol=0)


def test_launch_config_covers_small_and_large():
    assert launch_config(1, 1, 1) == {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 8,
                                      "num_warps": 4, "num_stages": 4}
    cfg = launch_config(131072, 1024, 128)  # W2's projection
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) == (128, 64, 32)


@pytest.mark.parametrize(
    "a,b,kwargs,error,message",
    [
        ("f32", "f64", {}, TypeError, "b must be float32; got float64"),
        ("1d", "f32", {}, ValueError, r"a must be a non-empty 2-D tensor; got shape \(5,\)"),
        ("f32", "short", {}, ValueError, "must share K"),
        ("f32", "f32", {"precision": "fast"}, ValueError, "precision must be one of ieee, tf32x3, tf32"),
        ("numpy", "f32", {}, TypeError, "a must be a torch.Tensor"),
    ],
)
def test_bad_inputs(a, b, kwargs, error, message):
    arrays = {
        "f32": torch.ones(5, 4, device=DEVICE), "f64": torch.ones(4, 3, dtype=torch.float64, device=DEVICE),
        "1d": torch.ones(5, device=DEVICE), "short": torch.ones(3, 3, device=DEVICE), "numpy": np.ones((5, 4)),
    }
    right = arrays[b] if b != "f32" else torch.ones(4, 3, device=DEVICE)
    with pytest.raises(error, match=message):
        matmul(arrays[a], right, **kwargs)

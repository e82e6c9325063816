"""quantkit ops: schemas + reference implementations, and the optional native CPU and CUDA kernels."""

from quantkit.ops import library
from quantkit.ops.cuda import cuda_status, load_cuda
from quantkit.ops.library import CONV_OPS, GEMM_OPS, op_names, select_op
from quantkit.ops.native import load_native, native_status

__all__ = [
    "CONV_OPS",
    "GEMM_OPS",
    "cuda_status",
    "library",
    "load_cuda",
    "load_native",
    "native_status",
    "op_names",
    "select_op",
]

load_native()
load_cuda()

"""Shared test helpers: the tolerance table for comparing kernels with the reference ops."""

from __future__ import annotations

import torch

__all__ = ["TOLERANCES", "assert_close_to_reference", "replayed"]

# Kernel output vs the reference op, by output dtype. Integer paths differ from the reference only in the
# order of the fp32 sum over weight groups (per-channel outputs are bit-identical); the fused W4A16 kernel
# reassociates the dot product; half-precision outputs may differ by one or two rounding steps.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
}


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """``torch.testing.assert_close`` with the tolerance of ``expected.dtype``; atol scaled by the output range."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    tol = TOLERANCES[expected.dtype]
    scale = max(1.0, expected.float().abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale)


def replayed(run):
    """``run()``'s output captured in a CUDA graph (after a warm-up off the default stream, as capture requires)
    and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = run()
    graph.replay()
    torch.cuda.synchronize()
    return static

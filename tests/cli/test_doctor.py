from click.testing import CliRunner

from quantkit.cli import cli
from quantkit.ops import native


def test_doctor_reports_kernels_and_compaction(monkeypatch):
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "torch" in result.output and "CUDA available" in result.output
    if native.native_status()["loaded"]:
        assert "CPU features" in result.output and "quantkit::gemm_w8a8" in result.output
        assert "compacted to the kernels' tile layout" in result.output
        monkeypatch.setenv("QUANTKIT_COMPACT", "0")
        off = CliRunner().invoke(cli, ["doctor"])
        assert off.exit_code == 0 and "canonical codes kept" in off.output
    else:
        assert "native kernels: not active" in result.output


def test_doctor_on_a_hopper_gpu_lists_the_fusions_loaded_exports_get(monkeypatch):
    """The GPU section as a Hopper machine with Triton prints it (the CUDA queries stubbed): the fusions a loaded
    export applies at its first GPU call, following their switches."""
    import torch

    import quantkit.ops as ops
    from quantkit.ops import cuda

    monkeypatch.setattr(ops, "cuda_status", lambda: {"loaded": True, "path": "jit:test", "error": None})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 (stub)")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(cuda, "resident_ok", lambda device: True)
    monkeypatch.setenv("QUANTKIT_CUTLASS_LIB", "/opt/lib/libquantkit_cutlass.so")
    monkeypatch.delenv("QUANTKIT_INT8_GEMM", raising=False)
    for name in ("QUANTKIT_FUSE", "QUANTKIT_FUSE_GROUPNORM"):
        monkeypatch.delenv(name, raising=False)
    out = CliRunner().invoke(cli, ["doctor"])
    assert out.exit_code == 0, out.output
    assert "NVIDIA H100 (stub)" in out.output
    assert ("8-bit linears (static activations): the CUTLASS int8 GEMM (/opt/lib/libquantkit_cutlass.so) "
            "(QUANTKIT_INT8_GEMM)") in out.output
    assert "fuse GEGLU, q/k/v projections, GroupNorms with the quantization" in out.output
    monkeypatch.setenv("QUANTKIT_FUSE_GROUPNORM", "0")
    no_gn = CliRunner().invoke(cli, ["doctor"])
    assert no_gn.exit_code == 0 and "fuse GEGLU, q/k/v projections with the quantization" in no_gn.output
    monkeypatch.setenv("QUANTKIT_FUSE", "0")
    off = CliRunner().invoke(cli, ["doctor"])
    assert off.exit_code == 0 and "are not fused (QUANTKIT_FUSE=0)" in off.output

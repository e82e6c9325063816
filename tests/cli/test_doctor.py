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

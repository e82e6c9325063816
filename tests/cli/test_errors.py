"""Every bad input gets one clear line (exit code 2), no traceback and no half-written output."""

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import quantkit
from quantkit.cli import cli
from quantkit.errors import QuantkitError


def _write(tmp_path, data, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _base(model):
    return {"model": str(model), "calibration": {"num_prompts": 1, "num_inference_steps": 1, "batch_size": 1}}


def _fails(args, match):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    text = result.output + (result.stderr if hasattr(result, "stderr") else "")
    assert result.exit_code == 2, text
    assert "Traceback" not in text
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines  # one message, the last thing printed
    assert match in errors[0], errors[0]
    return errors[0]


def _no_leftovers(folder: Path):
    assert not folder.exists()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.tmp")]


def test_missing_model_folder(tmp_path):
    cfg = _write(tmp_path, _base(tmp_path / "nope"))
    _fails(["run", cfg, "--out", tmp_path / "o", "--workdir", tmp_path / "w"], "model folder not found")
    _no_leftovers(tmp_path / "o")


def test_not_a_pipeline_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = _write(tmp_path, _base(tmp_path / "empty"))
    _fails(["export", cfg, "--out", tmp_path / "o"], "not a diffusers pipeline folder")
    _no_leftovers(tmp_path / "o")


def test_unknown_config_key(tmp_path, tiny_pipelines):
    data = _base(tiny_pipelines["sd"])
    data["quantization"] = {"weigths": {"bits": 4}}
    line = _fails(["run", _write(tmp_path, data), "--out", tmp_path / "o"], "unknown config key 'quantization.weigths'")
    assert "did you mean 'weights'" in line and "valid keys here" in line


def test_bits_outside_supported_set(tmp_path, tiny_pipelines):
    data = _base(tiny_pipelines["sd"])
    data["quantization"] = {"weights": {"bits": 5}}
    _fails(["calibrate", _write(tmp_path, data)], "weight bits must be one of [2, 3, 4, 8]")


def test_group_size_not_dividing(tmp_path, tiny_pipelines):
    data = _base(tiny_pipelines["sd"])
    data["quantization"] = {"weights": {"bits": 4, "group_size": 7}, "activations": None}
    _fails(["export", _write(tmp_path, data), "--out", tmp_path / "o"], "group_size 7 does not divide")
    _no_leftovers(tmp_path / "o")


def test_regex_matching_nothing(tmp_path, tiny_pipelines):
    data = _base(tiny_pipelines["sd"])
    data["quantization"] = {"ignore": ["re:.*no_such_layer.*"]}
    _fails(["export", _write(tmp_path, data), "--out", tmp_path / "o"], "matches no quantizable layer")


def test_output_folder_exists(tmp_path, tiny_pipelines):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    cfg = _write(tmp_path, _base(tiny_pipelines["sd"]))
    _fails(["run", cfg, "--out", tmp_path / "o"], "already exists; pass --overwrite")
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


def test_missing_and_invalid_config_file(tmp_path):
    _fails(["run", tmp_path / "missing.yaml"], "config file not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("quantization: [unclosed\n")
    _fails(["run", bad], "not valid YAML")


@pytest.fixture(scope="module")
def export_dir(tiny_pipelines, tmp_path_factory):
    root = tmp_path_factory.mktemp("errs")
    data = _base(tiny_pipelines["sd"])
    data["quantization"] = {"weights": {"bits": 4}, "activations": None}
    cfg = _write(root, data)
    result = CliRunner().invoke(cli, ["export", str(cfg), "--out", str(root / "out")])
    assert result.exit_code == 0, result.output
    return root / "out"


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_pickled_fp_component_refused_not_unpickled(tmp_path, tiny_pipelines):
    """A pipeline whose text encoder is a pickle gets the safetensors-only fix; the .bin is never opened."""
    pipe = _copy(tiny_pipelines["sd"], tmp_path / "pickled")
    (pipe / "text_encoder" / "model.safetensors").unlink()
    (pipe / "text_encoder" / "pytorch_model.bin").write_bytes(b"not a pickle: unpickling this raises")
    line = _fails(["export", _write(tmp_path, _base(pipe)), "--out", tmp_path / "o"], "reads only safetensors")
    assert "cannot load pipeline" in line and "safe_serialization=True" in line
    _no_leftovers(tmp_path / "o")


def test_pickled_component_of_export_refused(export_dir, tmp_path):
    out = _copy(export_dir, tmp_path / "copy")
    (out / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (out / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(QuantkitError, match="reads only safetensors") as err:
        quantkit.load_pipeline(out)
    assert "\n" not in str(err.value)


def test_truncated_safetensors(export_dir, tmp_path):
    out = _copy(export_dir, tmp_path / "copy")
    f = out / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _fails(["inspect", out], "corrupted or truncated safetensors")
    with pytest.raises(QuantkitError, match="corrupted or truncated"):
        quantkit.load_pipeline(out)


def test_garbage_safetensors_header(export_dir, tmp_path):
    out = _copy(export_dir, tmp_path / "copy")
    (out / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(QuantkitError, match="corrupted or truncated"):
        quantkit.load_pipeline(out)


def test_quantization_config_not_matching_tensors(export_dir, tmp_path):
    out = _copy(export_dir, tmp_path / "copy")
    cfg_path = out / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8  # tensors hold 4-bit
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(QuantkitError, match="weight_packed") as err:
        quantkit.load_pipeline(out)
    assert "\n" not in str(err.value)


def test_inspect_table(export_dir):
    result = CliRunner().invoke(cli, ["inspect", str(export_dir)])
    assert result.exit_code == 0, result.output
    assert "conv_in" in result.output and "w4-a16" in result.output and "ratio" in result.output


def test_cli_drops_only_transformers_torchvision_fallback_notice():
    import logging

    from quantkit.cli import _NoTorchvisionFallbackNotice

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    assert CliRunner().invoke(cli, ["doctor"]).exit_code == 0  # the group callback installs the filter
    log = logging.getLogger("transformers.utils.import_utils")
    keep = Keep()
    log.addHandler(keep)
    try:
        log.warning("`SiglipImageProcessor` requires torchvision (not installed); falling back to "
                    "`SiglipImageProcessorPil` for backward compatibility.")
        log.warning("some other transformers warning")
    finally:
        log.removeHandler(keep)
    assert keep.messages == ["some other transformers warning"]
    assert CliRunner().invoke(cli, ["doctor"]).exit_code == 0
    # one filter however often the CLI runs in a process
    assert sum(isinstance(f, _NoTorchvisionFallbackNotice) for f in log.filters) == 1

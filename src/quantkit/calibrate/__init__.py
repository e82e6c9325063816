"""Calibration: observe layer inputs and record the denoiser's I/O over prompts and timesteps."""

from quantkit.calibrate.artifact import CalibrationArtifact, load_artifact, save_artifact
from quantkit.calibrate.observers import OBSERVERS, ActivationObserver
from quantkit.calibrate.runner import calibrate_pipeline, load_or_calibrate

__all__ = ["OBSERVERS", "ActivationObserver", "CalibrationArtifact", "calibrate_pipeline", "load_artifact",
           "load_or_calibrate", "save_artifact"]

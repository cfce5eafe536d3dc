"""EDMSound: class-conditional diffusion on complex STFT spectrograms (Zhu et al., 2023).

``import edmsound`` gives the public API below (documented with an example per task in docs/api.md). Names are
loaded on first use, so importing the package is cheap and pulls in neither Gradio nor the copy-detection stack
until they are asked for. The package is layered, each layer using only those above it:

    audio  ->  core  ->  data, training  ->  copydetect, evaluation  ->  app, cli
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute), grouped by task
_API: dict[str, tuple[str, str]] = {}


def _export(module: str, *names: str, **renamed: str) -> None:
    for n in names:
        _API[n] = (module, n)
    for public, attr in renamed.items():
        _API[public] = (module, attr)


# generate
_export("edmsound.core.pipeline", "EDMSoundPipeline", "Generation", "save_generation", "clip_stem", "PRESET_DEFAULT",
        "MAX_NFE", "MAX_CLIPS")
_export("edmsound.core.samplers", "SAMPLERS", "FEW_STEP_SAMPLERS", "get_sampler", "valid_nfes", "steps_for_nfe")
_export("edmsound.core.schedules", "karras_sigmas", "get_schedule")
_export("edmsound.core.guidance", "GuidedDenoiser", "GUIDANCE_RANGE", "check_guidance", "check_guidance_interval",
        "format_guidance_interval", "interval_list")
_export("edmsound.core.codec", "SpectrogramCodec")
_export("edmsound.core.plotting", "spectrogram_figure", SPECTROGRAM_VIEWS="MODES")
# models and presets
_export("edmsound.core.presets", "Preset", "get_preset", "PRESETS", "PRECISIONS", "format_class_guidance")
_export("edmsound.core.model", "load_denoiser", "build_denoiser")
_export("edmsound.core.storage", "read_config", "resolve_model_dir", "find_models")
# audio in, out and level
_export("edmsound.audio.io", "load_audio", "write_wav", "wav_bytes", "to_pcm16", "AUDIO_EXTENSIONS")
_export("edmsound.audio.upload", "read_upload", "UploadError", "UPLOAD_EXTENSIONS")
_export("edmsound.audio.export", "EXPORT_FORMATS", "export_clip", "export_zip", "write_export",
        format_keeps_overs="keeps_overs")
_export("edmsound.audio.loudness", "ClipLevel", measure_level="measure", normalize_level="normalize",
        describe_level="describe", check_level_target="check_target", integrated_lufs="integrated_lufs",
        true_peak_dbtp="true_peak_dbtp")
# data
_export("edmsound.data.folder", "AudioSet", "load_folder", "read_clip", "ReadReport")
_export("edmsound.data.synth", "synthesize", "write_dataset", BUILTIN_CLASSES="CLASSES")
# training
_export("edmsound.training.trainer", "Trainer", "TrainingDiverged", "train", "init_distributed")
_export("edmsound.training.export", "attach_guide", "blend_models", "export_model", "missing_guide_note",
        "with_sampling_defaults")
_export("edmsound.training.distill", "Distiller")
_export("edmsound.training.consistency", "ConsistencyTuner")
_export("edmsound.training.bake", "GuidanceBaker")
_export("edmsound.training.spectrum_match", "SpectrumMatcher")
# copy detection
_export("edmsound.copydetect.encoders", "load_encoder")
_export("edmsound.copydetect.pretrain", "train_encoder")
_export("edmsound.copydetect.laion", "convert_laion_checkpoint")
_export("edmsound.copydetect.head", "train_head")
_export("edmsound.copydetect.index", "CopyIndex", "load_training_set")
_export("edmsound.copydetect.report", "analyse_copies", "stitching_analysis")
# evaluation
_export("edmsound.evaluation.sweep", "evaluate_sweep", "load_reference")
_export("edmsound.evaluation.points", "parse_points", "plan_sweep")
_export("edmsound.evaluation.classifier", "ClassifierConfig", "train_classifier", "load_classifier")
_export("edmsound.evaluation.calibrate", "calibrate_class_guidance", "write_calibration", "write_class_guidance",
        "chosen_text")
_export("edmsound.evaluation.matching_eq", "calibrate_class_eq", "write_class_eq", "write_eq_report")
_export("edmsound.evaluation.coverage", "measure_coverage", "write_coverage_report")
_export("edmsound.core.spectral_eq", "ClassEQ")
_export("edmsound.evaluation.quality", "quality_targets", "targets_markdown", "load_results",
        "check_speed_record", "speed_for_weights")
_export("edmsound.evaluation.ablate", "run_ablation")
# the app and process setup
_export("edmsound.app.service", "EDMSoundService")
_export("edmsound.app.ui", "build_demo", "launch_kwargs")
_export("edmsound.core.runtime", "reexec_with_jemalloc", "jemalloc_loaded")

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    try:
        module, attr = _API[name]
    except KeyError:
        raise AttributeError(f"module 'edmsound' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value          # cache: later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))

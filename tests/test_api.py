"""The package's public surface and its architecture: the names ``import edmsound`` gives (kept stable), a cheap
import, one-way dependencies between the subpackages with no import cycles (function-level imports included), and
an app and CLI that use only the public API."""
import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

import edmsound

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "edmsound"

PUBLIC_API = [
    "AUDIO_EXTENSIONS", "AudioSet", "BUILTIN_CLASSES", "ClassEQ", "ClassifierConfig", "ClipLevel", "ConsistencyTuner",
    "CopyIndex", "Distiller", "EDMSoundPipeline", "EDMSoundService", "EXPORT_FORMATS", "FEW_STEP_SAMPLERS",
    "GUIDANCE_RANGE", "Generation", "GuidanceBaker", "GuidedDenoiser",
    "MAX_CLIPS", "MAX_NFE", "PRECISIONS", "PRESETS", "PRESET_DEFAULT", "Preset", "ReadReport", "SAMPLERS", "SPECTROGRAM_VIEWS",
    "SpectrogramCodec", "SpectrumMatcher", "Trainer", "TrainingDiverged", "UPLOAD_EXTENSIONS", "UploadError", "analyse_copies", "attach_guide",
    "blend_models", "build_demo",
    "build_denoiser", "calibrate_class_eq", "calibrate_class_guidance", "check_guidance", "check_guidance_interval", "check_level_target",
    "check_speed_record", "chosen_text", "clip_stem", "convert_laion_checkpoint", "describe_level", "evaluate_sweep", "export_clip",
    "export_model", "export_zip", "find_models", "format_class_guidance", "format_guidance_interval", "format_keeps_overs", "get_preset", "get_sampler",
    "get_schedule", "init_distributed", "integrated_lufs", "interval_list", "jemalloc_loaded", "karras_sigmas",
    "launch_kwargs", "load_audio", "load_classifier", "load_denoiser", "load_encoder", "load_folder",
    "load_reference", "load_results", "load_training_set", "measure_coverage", "measure_level", "missing_guide_note",
    "normalize_level", "parse_points",
    "plan_sweep", "quality_targets", "read_clip", "read_config", "read_upload", "reexec_with_jemalloc",
    "resolve_model_dir", "run_ablation", "save_generation", "spectrogram_figure", "speed_for_weights", "steps_for_nfe", "stitching_analysis",
    "synthesize", "targets_markdown", "to_pcm16", "train", "train_classifier", "train_encoder", "train_head",
    "true_peak_dbtp", "valid_nfes", "wav_bytes", "with_sampling_defaults", "write_calibration",
    "write_class_eq", "write_class_guidance", "write_coverage_report", "write_dataset", "write_eq_report", "write_export", "write_wav", "__version__",
]

# which subpackages each may import (the layering: audio -> core -> data, training -> copydetect, evaluation -> app, cli)
ALLOWED = {
    "audio": set(),
    "core": {"audio"},
    "data": {"audio", "core"},
    "training": {"audio", "core", "data"},
    "copydetect": {"audio", "core", "data", "training"},
    "evaluation": {"audio", "core", "data", "training", "copydetect"},
    "app": {"<api>"},
    "cli": {"<api>"},
}


def test_public_api_is_stable_and_every_name_resolves():
    assert edmsound.__all__ == PUBLIC_API, "the public API changed: update docs/api.md and this list together"
    for name in PUBLIC_API:
        assert getattr(edmsound, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        edmsound.nope


def test_every_public_name_is_documented():
    doc = (ROOT / "docs" / "api.md").read_text()
    missing = [n for n in PUBLIC_API if n != "__version__" and f"`{n}" not in doc]
    assert not missing, f"docs/api.md does not mention {missing}"


def test_import_is_cheap():
    code = ("import sys, edmsound; heavy = {'gradio', 'transformers', 'faiss', 'torch'}; "
            "print(sorted(m for m in heavy if m in sys.modules)); edmsound.EDMSoundPipeline; "
            "print(sorted(m for m in ('gradio', 'transformers', 'faiss') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = out.stdout.strip().splitlines()
    assert before == "[]"            # nothing heavy until a name is used
    assert after == "[]"             # generating needs neither the app nor the copy-detection stack


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(target module, imported names, line) of every import in the file, module- and function-level."""
    mod = _module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "edmsound" or target.startswith("edmsound."):
                yield target, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("edmsound"):
                    yield a.name, [], node.lineno


def _all_modules():
    return sorted(p for p in PKG.rglob("*.py"))


def test_dependencies_point_one_way():
    bad = []
    for p in _all_modules():
        mod = _module_name(p)
        parts = mod.split(".")
        if len(parts) < 2:
            continue                              # the package root only maps names to modules
        me = parts[1]
        for target, names, line in _imports(p):
            tparts = target.split(".")
            if target == "edmsound":
                if me in ("app", "cli"):
                    hidden = [n for n in names if n not in PUBLIC_API]
                    if hidden:
                        bad.append(f"{p.relative_to(ROOT)}:{line} imports non-public {hidden}")
                    continue
                bad.append(f"{p.relative_to(ROOT)}:{line} imports the package root (library code imports modules)")
                continue
            other = tparts[1]
            if other == me:
                continue
            if other not in ALLOWED[me]:
                bad.append(f"{p.relative_to(ROOT)}:{line} ({me}) imports {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = defaultdict(set)
    modules = {_module_name(p): p for p in _all_modules()}
    for mod, p in modules.items():
        for target, names, _ in _imports(p):
            for cand in [f"{target}.{n}" for n in names] + [target]:
                if cand in modules and cand != mod and cand != "edmsound":
                    graph[mod].add(cand)
                    break
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in modules:
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_subpackage_says_what_it_owns():
    for init in PKG.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, f"{init.relative_to(ROOT)} needs a docstring saying what the package owns"
    for p in _all_modules():
        if p.name != "__init__.py" and p.name != "__main__.py":
            assert ast.get_docstring(ast.parse(p.read_text())), f"{p.relative_to(ROOT)} has no module docstring"

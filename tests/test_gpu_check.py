"""`benchmarks/gpu_check.py` runs at toy size on CPU here, so the script the GPU session runs cannot rot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_at_toy_size_and_writes_its_report(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    status = _gpu_check().main(["--toy", "--models", "QwQ-32B", "--batches", "1,2"])
    report = (tmp_path / "gpu_check.txt").read_text(encoding="utf-8")
    assert status == 0, report
    assert "RANDOM WEIGHTS AND A RANDOM PROBE" in report
    assert "| QwQ-32B (toy size) | 2 |" in report
    assert "[PASS] [float32] stop mode + answer (cached) equals the re-prefilled exit" in report
    assert "[PASS] the plug-in read each step's cue flag from the host mirror without waiting" in report
    assert "FAIL" not in report


def test_gpu_check_shapes_are_the_published_configs():
    shapes = _gpu_check().SHAPES
    assert shapes["QwQ-32B"]["num_hidden_layers"] == 64 and shapes["QwQ-32B"]["hidden_size"] == 5120
    assert shapes["DeepSeek-R1-Distill-Qwen-1.5B"]["num_key_value_heads"] == 2
    assert shapes["DeepSeek-R1-Distill-Qwen-7B"]["vocab_size"] == 152064

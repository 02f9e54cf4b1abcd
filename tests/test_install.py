"""What `pip install lynx-hf` brings: the runtime dependencies only, the pipeline and evaluation needs as extras
with an error naming the extra when one is missing, one version string, every shipped data file in the wheel, and the
license and citation files. `scripts/check_wheel.sh` does the same end to end in a fresh virtualenv."""

from __future__ import annotations

import configparser
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lynx_hf
from lynx_hf import MissingExtraError

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = {"torch", "transformers", "accelerate", "huggingface_hub", "safetensors", "numpy", "math-verify"}
OPTIONAL_MODULES = ("datasets", "matplotlib", "evaluate", "mkdocs", "vllm")


def setup_cfg() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg", encoding="utf-8")
    return config


def requirement_names(block: str) -> set[str]:
    names = set()
    for line in block.splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_install_requires_the_runtime_dependencies_only():
    required = requirement_names(setup_cfg()["options"]["install_requires"])
    assert required == {name.replace("_", "-") for name in RUNTIME}
    assert not required & {"datasets", "matplotlib", "evaluate", "tqdm", "mkdocs"}


def test_the_extras_split_the_pipeline_evaluation_and_docs_needs_and_test_pulls_them_all():
    extras = {name: requirement_names(block) for name, block in setup_cfg()["options.extras_require"].items()}
    assert {"build", "eval", "docs", "test", "all", "vllm"} <= set(extras)
    assert {"datasets", "tqdm"} <= extras["build"]
    assert {"evaluate", "matplotlib"} <= extras["eval"]
    assert {"mkdocs", "mkdocs-material", "mkdocstrings"} <= extras["docs"]
    assert extras["build"] | extras["eval"] | extras["docs"] <= extras["test"]
    assert extras["build"] | extras["eval"] | extras["docs"] <= extras["all"]


def test_the_version_has_one_source():
    assert setup_cfg()["metadata"]["version"].strip() == "attr: lynx_hf.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+", lynx_hf.__version__)


def test_a_missing_optional_package_names_the_extra_that_brings_it(monkeypatch):
    from lynx_hf._extras import require

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(MissingExtraError, match=re.escape('pip install "lynx-hf[eval]"')):
        require("matplotlib", extra="eval", purpose="the evaluation plots")
    monkeypatch.delitem(sys.modules, "lynx_hf.evaluation.plots", raising=False)
    with pytest.raises(ImportError, match=re.escape("lynx-hf[eval]")):  # MissingExtraError is an ImportError
        importlib.import_module("lynx_hf.evaluation.plots")


def test_loading_a_benchmark_without_datasets_names_the_build_extra(monkeypatch):
    from lynx_hf.pipeline.data import load_benchmark

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(MissingExtraError, match=re.escape('pip install "lynx-hf[build]"')):
        load_benchmark("openai/gsm8k")


def test_the_exit_metric_without_evaluate_names_the_eval_extra(monkeypatch):
    from lynx_hf.evaluation.evaluate import exit_metric

    monkeypatch.setitem(sys.modules, "evaluate", None)
    with pytest.raises(MissingExtraError, match=re.escape('pip install "lynx-hf[eval]"')):
        exit_metric.__wrapped__()


def test_import_and_the_one_line_usage_load_no_optional_package():
    code = """
import sys
from lynx_hf import Lynx, organism
model, tokenizer = organism.load()
problem = organism.problems("arithmetic", "test", n=1)[0]
inputs = tokenizer(organism.prompt(tokenizer, problem["question"]), return_tensors="pt", add_special_tokens=False)
lynx = Lynx.from_pretrained(organism.BUNDLE_DIR)
out = model.generate(**inputs, stopping_criteria=[lynx], max_new_tokens=300)
lynx.answer(out)
print(sorted(m for m in %r if m in sys.modules))
""" % (OPTIONAL_MODULES,)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_every_shipped_data_file_is_in_the_package_data():
    patterns = [p.strip() for p in setup_cfg()["options.package_data"]["lynx_hf"].split(",") if p.strip()]
    package = ROOT / "lynx_hf"
    covered = {path for pattern in patterns for path in package.glob(pattern) if path.is_file()}
    data = {path for path in package.rglob("*") if path.is_file() and path.suffix not in (".py", ".pyc")
            and "__pycache__" not in path.parts}
    assert data - covered == set(), "add these to [options.package_data]"
    assert (package / "py.typed").exists()


def test_license_and_citation_files_ship_with_the_repository():
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert setup_cfg()["metadata"]["license"].strip() == "Apache-2.0"
    citation = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    yaml = pytest.importorskip("yaml")
    parsed = yaml.safe_load(citation)
    assert parsed["cff-version"] and parsed["version"] == lynx_hf.__version__
    assert "2512.05325" in str(parsed["preferred-citation"])
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## {lynx_hf.__version__}" in changelog and "## 0.1.0" in changelog


@pytest.mark.parametrize("command", [["demo", "--n", "1"], ["eval", "--events", "nowhere"]])
def test_commands_that_need_the_eval_extra_say_so_before_loading_anything(command, monkeypatch, capsys):
    from lynx_hf.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(command) == 2
    assert 'pip install "lynx-hf[eval]"' in capsys.readouterr().err

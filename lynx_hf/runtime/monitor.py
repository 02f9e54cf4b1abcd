"""The online side of LYNX: one `GenerateCall` per `model.generate` call, holding that call's settings and per-row
state, so that nothing a later call (or any other forward of the model) does can change what an earlier call
decided or how its output is answered.

Timeline of one `_sample` step: forward on the last token (the hooks capture its hidden state) → logits processors
→ sample → append → stopping criteria. A cue word is an event only once the token after it shows that the word
ended ("Wait" + "ress" is no cue), exactly as the calibration events were found offline, so both plug-ins decide
one token after the cue: the stopping criterion when that token has been appended (the same step's forward computed
the cue's hidden state), the logits processor before the token after it is sampled (it scored the cue's hidden
state one call earlier).

How a call is recognised: transformers builds a fresh `StoppingCriteriaList` / `LogitsProcessorList` for every
`generate` call and calls the plug-ins through it from its decoding loop. The plug-ins key their state by that
list, so a new list is a new call whatever the sequence lengths (`use_cache=False`, continuing from an earlier
output, a pre-filled prefix cache, chunked prefill). Once per call they read, from the loop's frame, the model that
is generating, the prompt's attention mask and the decoding mode; every step, which rows the loop has finished (a
row another criterion ended never exits afterwards) and, in-stream, the forward's own logits (the answer after the
exit text is greedy on those, whatever processors did to the scores). The capture hooks are installed on that model
for the duration of the call only (removed when transformers drops the list), and they keep hidden states per
thread, so concurrent calls in different threads never read each other's states.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Literal, Protocol

import torch
from torch import nn
from transformers import LogitsProcessorList, StoppingCriteriaList

from ..errors import UnsupportedGenerationError
from .capture import layer_modules
from .config import LynxConfig
from .conformal import float32_threshold
from .cues import CueDetector
from .exit import eos_token_ids, exit_cut
from .probe import LynxProbe

Mode = Literal["stop", "stream"]


class BundleLike(Protocol):
    """What the per-call monitor and the plug-ins read from the bundle that runs them (`Lynx` is the one there is):
    the bundle's parts, what it is bound to now, and how it starts a call. The plug-ins depend on this, not on the
    `Lynx` class, so that no runtime module imports itself through another."""

    config: LynxConfig
    probe: LynxProbe | None
    tokenizer: object
    detector: CueDetector | None
    exit_ids: list[int]
    brace_delta: torch.Tensor
    audit_log: object  # the bundle's `AuditLog` (calls with audited rows are settled into it)
    _tap: "ModelTap | None"

    def _start_call(self, mode: str, model: nn.Module, input_ids: torch.LongTensor, attention_mask,
                    call_class: type, **overrides) -> "GenerateCall": ...

_REFUSED_LOOPS = {
    "_beam_search": "beam search (and other modes that reorder rows) is not supported: use greedy or sampling "
                    "(num_beams=1).",
    "_assisted_decoding": "assisted/speculative decoding and prompt lookup (several tokens per forward) are not "
                          "supported: drop `assistant_model` / `prompt_lookup_num_tokens` from this generate call.",
}


@dataclass(frozen=True)
class ExitRecord:
    """What happened to one row in one `generate` call.

    `would_exit` says whether the exit rule fired; `exited` whether the plug-in acted on it (never in shadow mode).
    `position` is the index (in the returned sequence) of the token that completed that cue, `start` the index of
    the cue word's first token; -1 and None when the rule never fired. `answered` (in-stream mode only) says
    whether the row closed its forced answer before the token budget ran out; None in stop mode, where
    `Lynx.answer(...)` writes the answer. `by_budget` says that the exit came from the thinking budget
    (`max_thinking_tokens`), not from a confident cue: then `position` is the row's last thinking token, `start`
    the index after it (nothing is dropped), and `cue` and `score` are None. `audited` says that the row was drawn
    for the live audit (`audit_rate`): it ran as in shadow mode (never exited) so that `Lynx.audit()` can compare
    its would-exit answer with its full one.

    A row that ended (EOS, a stop string, a criterion of yours) is over: it never exits afterwards, and its EOS is
    no thinking token, so the budget never exits a row at its own EOS. A cue that the row's EOS confirms is an
    event, as in the calibration traces (which end there): stop mode and `custom_generate` exit at it; in-stream
    the row has already ended when the decision comes, so it is recorded `would_exit=True, exited=False`.

    In thinking tokens (generated tokens inside the thinking block, counted as the budget counts them, before the
    row's end: its first end-of-sequence token is no thinking token): `thinking_tokens` is how many the row thinks
    with the exit: up to its exit where the rule fired (what `Lynx.answer` keeps in stop mode: the cue word dropped; in-stream: up to
    the token after the cue, or the budget's last token), else all of them. `full_thinking_tokens` is how many it
    thinks without the exit, where that is known: rows that did not exit, and shadow or audited rows, which ran in
    full (then `full_thinking_tokens - thinking_tokens` is what the exit would have saved); None for a row that
    exited, whose thinking was cut. Both count only what this call generated (a row cut by `max_new_tokens` while
    thinking thought at least that much).

    Example:
        >>> ExitRecord(exited=True, would_exit=True, position=12, start=11, cue="wait", score=0.97, threshold=0.9,
        ...            cues_seen=2, shadow=False).cue
        'wait'
    """

    exited: bool
    would_exit: bool
    position: int
    start: int
    cue: str | None
    score: float | None
    threshold: float
    cues_seen: int
    shadow: bool
    answered: bool | None = None
    by_budget: bool = False
    audited: bool = False
    thinking_tokens: int | None = None
    full_thinking_tokens: int | None = None


class ModelTap:
    """Forward hooks on the decoder layers the probe reads, installed only while a `generate` call that uses a Lynx
    plug-in runs, with the captured states (last position of each forward) kept per thread.

    A model's plain forwards and plain `generate` calls pay nothing: no hook is registered outside Lynx calls.
    """

    def __init__(self, model: nn.Module, layers, device: torch.device | None = None):
        self.layers = tuple(int(i) for i in layers)
        self.device = device
        self._modules = layer_modules(model, self.layers)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._users = 0
        self._handles: list = []

    def acquire(self) -> None:
        """Start capturing in this thread (hooks registered when the first user arrives)."""
        local = self._local
        if getattr(local, "states", None) is None:
            local.states = [None] * len(self.layers)
            local.previous = [None] * len(self.layers)
            local.forwards = 0  # counts up for the thread's lifetime; each call remembers where it started
        with self._lock:
            if self._users == 0:
                self._handles = [m.register_forward_hook(self._make_hook(slot)) for slot, m in enumerate(self._modules)]
            self._users += 1

    def release(self) -> None:
        """One user fewer; the hooks go away with the last one."""
        with self._lock:
            self._users = max(self._users - 1, 0)
            if self._users == 0:
                for handle in self._handles:
                    handle.remove()
                self._handles = []

    def _make_hook(self, slot: int):
        local = self._local
        first = slot == min(range(len(self.layers)), key=lambda i: self.layers[i])  # the layer a forward reaches first

        def hook(module: nn.Module, args, output) -> None:
            # Keeps a reference only (no tensor op): the probe slices the last position when a cue needs scoring.
            if getattr(local, "states", None) is None:  # a thread with no Lynx call running
                return
            if first:
                local.previous, local.states = local.states, [None] * len(self.layers)
                local.forwards += 1
            local.states[slot] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def forwards(self) -> int:
        """Forwards of the model this thread has run while the hooks were on."""
        return getattr(self._local, "forwards", 0)

    def features(self, previous: bool = False) -> torch.Tensor:
        """This thread's captured layers at the last position of the last forward (`previous`: of the one before),
        concatenated, `[batch, sum(hidden)]`, on the probe's device."""
        states = getattr(self._local, "previous" if previous else "states", None)
        if states is None or any(s is None for s in states):
            raise UnsupportedGenerationError(
                "Lynx found no hidden states from this generate call's forward: the model ran no forward through "
                "its decoder layers since the last step (a compiled or otherwise hook-free forward is not supported)."
            )
        device = self.device or states[0].device
        return torch.cat([s[:, -1].to(device) for s in states], dim=-1)


class HostMirror:
    """One small device value copied to the host without waiting for it, read one decoding step later.

    `generate` itself waits for the device once per step (its unfinished-sequences check), so by the next step the
    copy has landed and reading it costs nothing; if it has not (a loop that never waits), `read` waits for it and
    counts that in `waits`. On a CPU the copy is immediate.

    Example:
        >>> mirror = HostMirror(torch.device("cpu"))
        >>> mirror.push(torch.tensor(7))
        >>> mirror.read()
        7
    """

    def __init__(self, device: torch.device):
        accelerated = device.type != "cpu"
        self._host = torch.zeros((), dtype=torch.long, pin_memory=device.type == "cuda")
        self._view = self._host.numpy()
        self._event = torch.Event(device=device) if accelerated else None
        self._non_blocking = accelerated
        self.waits = 0

    def push(self, value: torch.Tensor) -> None:
        """Start copying `value` (a 0-d tensor) to the host."""
        self._host.copy_(value, non_blocking=self._non_blocking)
        if self._event is not None:
            self._event.record()

    def read(self) -> int:
        """The value pushed last."""
        if self._event is not None and not self._event.query():
            self._event.synchronize()
            self.waits += 1
        return int(self._view)


def caller_list(frame: FrameType | None) -> tuple[object, FrameType] | None:
    """The `StoppingCriteriaList` / `LogitsProcessorList` whose `__call__` is at or above `frame` (a few frames at
    most), and the frame of the loop that called it; None when the plug-in was called directly. Of nested lists
    (a list of the user's inside the one `generate` builds) the outermost: the inner one may be reused across calls."""
    found = None
    for _ in range(8):
        if frame is None:
            break
        owner = frame.f_locals.get("self") if frame.f_code.co_name == "__call__" else None
        if isinstance(owner, (StoppingCriteriaList, LogitsProcessorList)):
            found = owner, frame.f_back
        elif found is not None:
            break  # the frame above the outermost list: the decoding loop
        frame = frame.f_back
    return found


def loop_logits(loop: FrameType | None, scores: torch.Tensor) -> torch.Tensor:
    """The model's own next-token logits of this step, read from the decoding loop's frame: the forward's output
    (`outputs.logits` in `_sample`), which no logits processor changes, not even one that edits the copy it is
    handed in place."""
    outputs = loop.f_locals.get("outputs") if loop is not None else None
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor) and logits.dim() == 3:
        logits = logits[:, -1]
    if not isinstance(logits, torch.Tensor) or logits.shape != scores.shape:
        raise UnsupportedGenerationError(
            "Lynx's in-stream exit could not read the model's logits of this step from transformers' decoding loop "
            "(`outputs.logits` in `_sample`), which it needs to answer greedily as the calibration labels were: "
            "use stop mode (stopping_criteria=[lynx.stopper()], then lynx.answer(out)) with this transformers version."
        )
    return logits


def loop_running(loop: FrameType | None, batch: int) -> torch.Tensor | None:
    """Which rows transformers' decoding loop has not finished yet (`unfinished_sequences` in `_sample`), or None
    where the loop keeps no such flags."""
    running = loop.f_locals.get("unfinished_sequences") if loop is not None else None
    return running if isinstance(running, torch.Tensor) and running.shape == (batch,) else None


def loop_end_ids(loop: FrameType | None, device: torch.device) -> torch.Tensor:
    """The token ids that end a row in transformers' decoding loop: the EOS ids of its stopping criteria (those with
    an `eos_token_id`, as `_sample` itself tells them), `[n]` long on `device`; empty where EOS ends nothing."""
    criteria = loop.f_locals.get("stopping_criteria") if loop is not None else None
    ids = [torch.as_tensor(c.eos_token_id).reshape(-1) for c in (criteria or ())
           if getattr(c, "eos_token_id", None) is not None]
    return torch.cat(ids).to(device=device, dtype=torch.long) if ids else torch.zeros(0, dtype=torch.long, device=device)


def loop_context(loop: FrameType | None) -> tuple[nn.Module, torch.Tensor | None]:
    """(generating model, attention mask so far) from transformers' decoding-loop frame."""
    name = loop.f_code.co_name if loop is not None else "<unknown>"
    if name in _REFUSED_LOOPS:
        raise UnsupportedGenerationError(f"Lynx cannot follow this generate call: {_REFUSED_LOOPS[name]}")
    local = loop.f_locals if loop is not None else {}
    model = local.get("self")
    if name != "_sample" or not isinstance(model, nn.Module):
        raise UnsupportedGenerationError(
            f"Lynx follows transformers' greedy/sampling loop (`_sample`), but was called from `{name}`: use "
            "greedy or sampling with num_beams=1, or call the plug-in through model.generate(...)."
        )
    model_kwargs = local.get("model_kwargs") or {}
    return model, model_kwargs.get("attention_mask")


class GenerateCall:
    """One `generate` call seen by one plug-in: the settings it ran with, per-row state, and what it produced.

    Settings (confidence, guarantee, threshold, shadow, thinking budget) are read once when the call starts, so
    changing them on the `Lynx` later never rewrites a finished call's records. A `Lynx` without a probe
    (`ThinkingBudgetCriteria`) has no capture tap: its calls never score a cue and exit by the budget only.
    """

    def __init__(self, lynx: BundleLike, mode: Mode, model: nn.Module, input_ids: torch.LongTensor,
                 attention_mask: torch.Tensor | None, *, threshold: float, shadow: bool,
                 max_thinking_tokens: int | None = None, audited: list[bool] | None = None):
        self.lynx = lynx
        self.mode = mode
        # Held weakly: a bundle's recent calls must not keep a model the user dropped (e.g. reloaded) in memory.
        self._model = weakref.ref(model)
        self.shadow = shadow
        self.threshold = threshold
        # What the bundle is bound to now, kept with the call: answering its output later uses these even if the
        # bundle has since followed another model.
        self.tap = lynx._tap
        self.detector = lynx.detector
        self.tokenizer = lynx.tokenizer
        self.exit_ids = list(lynx.exit_ids)
        self.think_end = lynx.config.think_end  # where a row's final response starts (`LynxAnswer.text`)
        self.exit_construction = lynx.config.exit_construction
        device = input_ids.device
        batch = input_ids.shape[0]
        self.batch = batch
        self.prompt_length = input_ids.shape[1] - (1 if mode == "stop" else 0)
        if self.prompt_length == 0:
            raise UnsupportedGenerationError(
                "generate(inputs_embeds=...) without input_ids: Lynx cannot read the prompt's tokens, so it cannot "
                "tell whether the thinking block is open. Pass the prompt's ids too: "
                "model.generate(input_ids=ids, inputs_embeds=embeds, ...)."
            )
        mask = attention_mask[:, : self.prompt_length] if attention_mask is not None else None
        self.prompt_mask = mask.to(device=device, dtype=torch.long) if mask is not None else None
        self.state = self.detector.start(input_ids[:, : self.prompt_length], self.prompt_mask)
        self._consumed = self.prompt_length
        self.sequences = input_ids
        self._forwards: int | None = None
        # What the host knows without waiting for the device: whether the previous step left a cue to confirm (read
        # one step late from `_cue_mirror`, riding on generate's own wait), and whether a row has been made to exit.
        self._cue_mirror = HostMirror(device)
        self._cue_mirror.push(self.state.ids.max())
        self._exit_mirror = HostMirror(device)
        self._exit_pushed = False
        self.no_exit_yet = True
        self.nothing = torch.zeros(batch, dtype=torch.bool, device=device)  # the decisions of a step without events
        long = dict(dtype=torch.long, device=device)
        self.exited = torch.zeros(batch, dtype=torch.bool, device=device)
        # Each decision step's (position, rows decided, cue, cue end, score), kept as references (no tensor op) and
        # read on the host when records are (`_exits`); a row's first decision is its exit.
        self._decisions: list[tuple] = []
        self._resolved: tuple[int, list] = (0, [None] * batch)
        self.cues_seen = torch.zeros(batch, **long)
        # The thinking budget: per row, generated tokens after which it was inside the thinking block.
        self.max_thinking_tokens = max_thinking_tokens
        self.thinking_tokens = torch.zeros(batch, **long)
        self.by_budget = torch.zeros(batch, dtype=torch.bool, device=device)
        # The ids that end a row (the call's EOS; set by whoever starts the call): a row's ending token is no
        # thinking token, so the budget never exits a row at its own EOS, while a cue that EOS confirms is an event
        # (the calibration traces end there too).
        self.end_ids = torch.zeros(0, dtype=torch.long, device=device)
        # In-stream, each decision step's (decisions, rows still running after the token): references, read when
        # records are, to find rows whose exit came at the token that ended them, too late for the plug-in to act.
        self._late: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._tau = torch.tensor(float32_threshold(threshold), dtype=torch.float32, device=device)
        self.consumed_caches: set[int] = set()  # ids of KV caches that `Lynx.answer` already used up
        # Rows drawn for the live audit run as in shadow mode; None (no row drawn) keeps the step path unchanged.
        self.audited = torch.tensor(audited, device=device) if audited is not None and any(audited) else None
        self.audit_settings: dict | None = None  # guarantee, confidence, risk level, rule (set by `Lynx`)
        self.final_ids: torch.Tensor | None = None  # in-stream: the ids the answer stopper saw last
        self._thinking_replay: list | None = None  # (cue state, positions replayed, in-think flags): `records`
        if self.tap is not None:
            self.tap.acquire()
            self._start_forwards = self.tap.forwards()
        self._released = False

    @property
    def model(self) -> nn.Module:
        """The model that ran this call."""
        model = self._model()
        if model is None:
            raise UnsupportedGenerationError(
                "The model that produced these outputs no longer exists (it was deleted or reloaded): answer "
                "outputs of the model you are using now."
            )
        return model

    def release(self) -> None:
        """The call is over: its hooks may go (idempotent)."""
        if not self._released:
            self._released = True
            if self.tap is not None:
                self.tap.release()
            self.tap = None  # nor the hooks' modules

    def _score(self) -> torch.Tensor:
        """The probe's scores of the cue token's hidden state: in stop mode the last forward fed it, in-stream the one
        before. Before the call has captured that forward there is no generated token to score; without a probe
        (`ThinkingBudgetCriteria`) nothing is scored."""
        previous = self.mode == "stream"
        if self.tap is None or self.tap.forwards() - self._start_forwards < 1 + previous:
            return torch.zeros(self.batch, dtype=torch.float32, device=self.exited.device)
        return self.lynx.probe.predict_proba(self.tap.features(previous)).to(self.exited.device, torch.float32)

    def observe(self, input_ids: torch.LongTensor, running: torch.Tensor | None = None,
                running_after: torch.Tensor | None = None) -> torch.Tensor:
        """Consume the token appended since the last step; return this step's exit decisions `[batch]` (bool).

        `running` (`[batch]`, nonzero for rows generate had not finished before the token just appended; default
        all) keeps rows that another criterion already stopped (a stop string, EOS, a criterion of yours) from
        exiting or counting cues on what generate writes after their end (padding, or model tokens where no EOS is
        set). A row that the token just appended ended (by default: its token is one of `end_ids`, its EOS) has no
        thinking token there, so the budget never exits it at that token; but the token does confirm a cue completed
        just before it, as the offline events (found on traces cut before their EOS) count a cue at a trace's end.
        `running_after` (`[batch]`, nonzero for rows generate has not finished after that token), given by a
        plug-in that reads the loop one step later (in-stream), says which rows ended there by any criterion; an
        exit decided for such a row is recorded (`would_exit`) but not acted on: it is too late.

        A step after which no row has a cue to confirm (nearly all of them) only advances the cue automaton and
        mirrors its largest state to the host: six tensor ops, no host sync; it returns `self.nothing` (which the
        plug-ins copy before handing it to the caller)."""
        length = input_ids.shape[1]
        new = length - self._consumed
        if new == 0:
            return self.nothing
        if new != 1 or input_ids.shape[0] != self.batch:
            raise UnsupportedGenerationError(
                f"Lynx expected one new token per row per step but got {new} on {input_ids.shape[0]} rows "
                f"(started with {self.batch}): only greedy and sampling decoding are supported."
            )
        forwards = self.tap.forwards() if self.tap is not None else None
        if forwards is not None and self._forwards is not None and forwards == self._forwards:
            raise UnsupportedGenerationError(
                "The model's forward ran without Lynx's capture hooks in this generate call, so Lynx cannot read the "
                "hidden states it scores: a compiled forward (torch.compile, or generate's own compilation, which skips "
                "forward hooks added after compiling) is not supported. Generate without compiling (restore "
                "model.forward, or pass disable_compile=True)."
            )
        if forwards is not None and self._forwards is not None and forwards != self._forwards + 1:
            raise UnsupportedGenerationError(
                f"The model ran {forwards - self._forwards} forwards between two decoding steps of this generate "
                "call (expected 1), so Lynx cannot tell which one's hidden states to score: classifier-free guidance "
                "(guidance_scale) and logits processors that run the model are not supported; use plain greedy or "
                "sampling decoding."
            )
        self._forwards = forwards
        self.sequences = input_ids
        if self._exit_pushed:  # the last decision step's outcome has reached the host
            self._exit_pushed = False
            self.no_exit_yet = self.no_exit_yet and not self._exit_mirror.read()
        cue_waiting = self._cue_mirror.read() >= self.detector.first_completed
        token = input_ids[:, -1]
        before = self.state.ids
        self.detector.advance(self.state, token)
        self._consumed = length
        self._cue_mirror.push(self.state.ids.max())
        budget_due = False
        if self.max_thinking_tokens is not None:
            # Per row, generated tokens after which it was inside the thinking block (rows generate ended excluded).
            thinking = self.state.in_think
            if running is not None:
                thinking = thinking & running.to(device=thinking.device, dtype=torch.bool)
            if running_after is None:
                thinking = thinking & ~torch.isin(token, self.end_ids)
            else:
                thinking = thinking & running_after.to(device=thinking.device, dtype=torch.bool)
            self.thinking_tokens += thinking
            budget_due = length - self.prompt_length >= self.max_thinking_tokens  # no row can be over it before
        if not cue_waiting and not budget_due:
            return self.nothing
        decide = self._decide(before, token, length, running, cue_waiting, thinking if budget_due else None)
        if running_after is not None:
            self._late.append((decide, running_after))
            decide = torch.logical_and(decide, running_after.to(decide.device))
        if not self.shadow:
            self._exit_mirror.push(self.acting(decide).any())
            self._exit_pushed = True
        return decide

    def _decide(self, before: torch.Tensor, token: torch.Tensor, length: int, running: torch.Tensor | None,
                cue_waiting: bool, thinking: torch.Tensor | None) -> torch.Tensor:
        """A step where a cue waits for confirmation or the thinking budget may run out: the exit decisions."""
        # The cue completed at the previous token; the token just appended says whether its word really ended.
        event_cue, event_end = self.detector.confirmed(before, token) if cue_waiting else (None, None)
        position = length - 2
        if event_cue is not None:
            event = event_cue >= 0
            if running is not None:
                event = event & running.to(device=event.device, dtype=torch.bool)
            score = self._score()
            decide = event & ~self.exited & (score >= self._tau)
        else:
            event = decide = self.nothing
        budget = None
        if thinking is not None:
            # A row still thinking after its budget's last token exits there (a confident cue at the same step wins).
            budget = thinking & (self.thinking_tokens >= self.max_thinking_tokens) & ~self.exited & ~decide
        if event_cue is not None:
            # A row that exited is over: without an EOS criterion transformers keeps writing model tokens (not
            # padding) after a custom criterion stopped it, and their cues must not count. Shadow mode counts every
            # cue, as do audited rows.
            if self.shadow:
                self.cues_seen += event
            elif self.audited is None:
                self.cues_seen += event & ~self.exited
            else:
                self.cues_seen += event & ~(self.exited & ~self.audited)
            self.exited |= decide
            self._decisions.append((position, decide, event_cue, event_end, score))
        if budget is None:
            return decide
        self.by_budget |= budget
        self.exited |= budget
        self._decisions.append((position + 1, budget, None, None, None))  # the budget's last token; nothing dropped
        return decide | budget

    def acting(self, decide: torch.Tensor) -> torch.Tensor:
        """The rows of `decide` that the plug-in acts on: none in shadow mode, none of the audited rows."""
        if decide is self.nothing:
            return decide
        if self.shadow:
            return torch.zeros_like(decide)
        return decide if self.audited is None else decide & ~self.audited

    def answered(self) -> list[bool | None]:
        """Per row, whether its forced answer closed (in-stream mode); None in stop mode."""
        return [None] * self.batch

    def records(self) -> list[ExitRecord]:
        """Per-row telemetry of this call."""
        exits = self._exits()
        audited = self.audited.tolist() if self.audited is not None else [False] * self.batch
        records = []
        counts, ends = self._thinking_counts()
        for row, (exit_, seen, answered, was_audited, missed) in enumerate(
                zip(exits, self.cues_seen.tolist(), self.answered(), audited, self.missed())):
            position, start, cue, score, budget = exit_ if exit_ is not None else (-1, -1, -1, None, False)
            acted = exit_ is not None and not self.shadow and not was_audited and not missed
            full = counts[row][ends[row]]
            if exit_ is None:
                used = full
            else:
                used = counts[row][min(max(self._kept_end(position, start, budget) - self.prompt_length, 0), ends[row])]
            records.append(ExitRecord(
                exited=acted, would_exit=exit_ is not None, position=position, start=start,
                cue=self.detector.cues[cue] if cue >= 0 else None, score=score, threshold=self.threshold,
                cues_seen=seen, shadow=self.shadow, answered=answered if acted else None, by_budget=budget,
                audited=bool(was_audited), thinking_tokens=used, full_thinking_tokens=None if acted else full,
            ))
        return records

    def _kept_end(self, position: int, start: int, by_budget: bool) -> int:
        """Index after the last thinking token a row keeps when it exits at `position`: in stop mode `Lynx.answer`'s
        cut; in-stream the token after the cue (the budget's last token) is the last one before the exit text."""
        if self.mode == "stream":
            return position + (1 if by_budget else 2)
        return exit_cut(position, start, self.exit_construction)

    def _thinking_counts(self) -> tuple[list[list[int]], list[int]]:
        """Per row, the running count of thinking tokens over the generated positions (`counts[row][k]`: among the
        first k), and where the row ends (at its first end-of-sequence token, which is no thinking token). The cue
        automaton is replayed over the output once, incrementally, off the decoding loop (records are read on the
        host anyway)."""
        sequences = self.sequences
        final = self.final_ids  # in-stream: the ids with the last token, which the processor never sees
        if isinstance(final, torch.Tensor) and final.shape[0] == self.batch and final.shape[1] > sequences.shape[1]:
            sequences = final
        length = sequences.shape[1]
        replay = self._thinking_replay
        if replay is None:
            state = self.detector.start(sequences[:, : self.prompt_length], self.prompt_mask)
            replay = self._thinking_replay = [state, self.prompt_length, []]
        state, upto, flags = replay
        for t in range(upto, length):
            self.detector.advance(state, sequences[:, t])
            flags.append(state.in_think)
        replay[1] = max(upto, length)
        generated = length - self.prompt_length
        if flags:
            inside = torch.stack(flags[:generated], 1).long()
            counts = torch.cat([torch.zeros_like(inside[:, :1]), inside.cumsum(1)], 1).tolist()
        else:
            counts = [[0] for _ in range(self.batch)]
        eos = set(self.end_ids.tolist()) or set(self._eos_ids())  # the loop's own EOS, else the model's
        ends = []
        for row in sequences[:, self.prompt_length:].tolist():
            ends.append(next((k for k, token in enumerate(row) if token in eos), len(row)))
        return counts, ends

    def _eos_ids(self) -> list[int]:
        model = self._model()
        return eos_token_ids(model, self.tokenizer) if model is not None else \
            [t for t in [getattr(self.tokenizer, "eos_token_id", None)] if t is not None]

    def missed(self) -> list[bool]:
        """Per row, whether its exit was decided at the token that ended it (in-stream: generate had already
        finished the row, so the plug-in could not act on it)."""
        missed = torch.zeros(self.batch, dtype=torch.bool, device=self.exited.device)
        for decide, after in self._late:
            missed |= decide & ~after.to(device=missed.device, dtype=torch.bool)
        return missed.tolist()

    def _exits(self) -> list[tuple | None]:
        """Per row, `(position, start, cue index, score, by budget)` of its exit, or None: its first decision. Found
        incrementally, each decision step once, while the tokens it read are still the output's."""
        done, found = self._resolved
        new = self._decisions[done:]
        if new:
            decided = torch.stack([d[1] for d in new]).tolist()
            for (position, _, cue, end, score), rows in zip(new, decided):
                if not any(hit and found[row] is None for row, hit in enumerate(rows)):
                    continue
                cues, ends = (cue.tolist(), end.tolist()) if cue is not None else (None, None)
                scores = score.tolist() if score is not None else None
                for row, hit in enumerate(rows):
                    if not hit or found[row] is not None:
                        continue
                    if cues is None:  # the budget: `start` is the index after its last token
                        found[row] = (position, position + 1, -1, None, True)
                    else:
                        ids = self.sequences[row, : position + 1].tolist()
                        start = self.detector.cue_start(ids, position, cues[row], ends[row])
                        found[row] = (position, start, cues[row], scores[row], False)
            self._resolved = (len(self._decisions), found)
        return found

    def matches(self, sequences: torch.Tensor) -> bool:
        """Whether `sequences` is this call's output (what generate returned: the ids it saw, possibly with
        trailing steps undone)."""
        seen = self.sequences if self.final_ids is None else self.final_ids
        # In-stream, the processor never sees the call's last token; without the answer stopper nothing else does.
        extra = 1 if self.mode == "stream" and self.final_ids is None else 0
        if sequences.shape[0] != seen.shape[0] or \
                not self.prompt_length < sequences.shape[1] <= seen.shape[1] + extra:
            return False
        if max((e[0] for e in self._exits() if e is not None), default=-1) >= sequences.shape[1]:
            return False
        width = min(sequences.shape[1], seen.shape[1])
        return torch.equal(seen[:, :width], sequences[:, :width].to(seen.device))


class LastCall:
    """The last `GenerateCall` started in each thread: `get()` gives this thread's, else (a thread that started none,
    e.g. the main thread reading a worker's result) the last one started anywhere. Per thread, so that threads
    sharing one `Lynx` each read their own call's records."""

    def __init__(self):
        self._local = threading.local()
        self._any: GenerateCall | None = None

    def set(self, call: GenerateCall) -> None:
        self._local.call = call
        self._any = call

    def get(self) -> GenerateCall | None:
        call = self.here()
        return call if call is not None else self._any

    def here(self) -> GenerateCall | None:
        """The last call started in this thread only (None if it started none)."""
        return getattr(self._local, "call", None)


class CallTracker:
    """Finds (or starts) the `GenerateCall` of the running `generate` call for one plug-in."""

    def __init__(self, lynx: BundleLike, mode: Mode, call_class: type[GenerateCall] = GenerateCall,
                 check_list: Callable[[object], None] | None = None):
        self.lynx = lynx
        self.mode = mode
        self.call_class = call_class
        self.check_list = check_list  # called with the call's criteria/processor list when a call starts
        self._recent: tuple[weakref.ref, GenerateCall] | None = None  # (owner, call), replaced as one object
        self._calls: dict[int, tuple[weakref.ref, GenerateCall]] = {}
        self._lock = threading.Lock()
        self._last = LastCall()

    @property
    def last(self) -> GenerateCall | None:
        """The last call this plug-in started in this thread (else in any thread)."""
        return self._last.get()

    @property
    def running_here(self) -> GenerateCall | None:
        """The last call this plug-in started in this thread only: the running one while this thread generates."""
        return self._last.here()

    def current(self, input_ids: torch.LongTensor, frame: FrameType | None) -> GenerateCall:
        """The call this step belongs to. `frame` is the plug-in's caller."""
        return self.current_and_loop(input_ids, frame)[0]

    def current_and_loop(self, input_ids: torch.LongTensor,
                         frame: FrameType | None) -> tuple[GenerateCall, FrameType | None]:
        """The call this step belongs to, and the frame of transformers' decoding loop running it."""
        found = caller_list(frame)
        if found is None:
            raise UnsupportedGenerationError(
                "Lynx plug-ins must run inside model.generate(...) (stopping_criteria=[...] / logits_processor=[...]); "
                "to decode with your own loop use the custom_generate recipe shipped in the bundle."
            )
        owner, loop = found
        recent = self._recent
        if recent is not None and recent[0]() is owner:
            return recent[1], loop
        with self._lock:
            entry = self._calls.get(id(owner))
            if entry is not None and entry[0]() is owner:
                call = entry[1]
            else:
                call = self._start(owner, loop, input_ids)
            self._recent = (weakref.ref(owner), call)
        return call, loop

    def lookup(self, owner) -> GenerateCall | None:
        """The call started for (or registered under) the list `owner`, if any."""
        with self._lock:
            entry = self._calls.get(id(owner))
        return entry[1] if entry is not None and entry[0]() is owner else None

    def start(self, owner, loop: FrameType | None, input_ids: torch.LongTensor) -> GenerateCall:
        """Start the call of `owner` (a processor list) from `input_ids` (the prompt), before the plug-in's own first
        step: the Lynx criterion does so when it joins its exit processor to a running call."""
        with self._lock:
            call = self._start(owner, loop, input_ids)
            self._recent = (weakref.ref(owner), call)
        return call

    def register(self, owner, call: GenerateCall) -> None:
        """Make `call` the call of a second list too (the criteria list of the call that the Lynx criterion joined)."""
        with self._lock:
            key = id(owner)
            self._calls[key] = (weakref.ref(owner), call)
            weakref.finalize(owner, self._finish, key, call)

    def _start(self, owner, loop: FrameType | None, input_ids: torch.LongTensor) -> GenerateCall:
        model, mask = loop_context(loop)
        if self.check_list is not None:
            self.check_list(owner)
        call = self.lynx._start_call(self.mode, model, input_ids, mask, self.call_class)
        call.end_ids = loop_end_ids(loop, call.end_ids.device)
        key = id(owner)
        self._calls[key] = (weakref.ref(owner), call)
        weakref.finalize(owner, self._finish, key, call)
        self._last.set(call)
        return call

    def _finish(self, key: int, call: GenerateCall) -> None:
        call.release()
        with self._lock:
            entry = self._calls.get(key)
            if entry is not None and entry[1] is call:
                del self._calls[key]

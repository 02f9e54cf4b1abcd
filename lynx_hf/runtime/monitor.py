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
from .cues import CueDetector, asks_host
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

        def hook(module: nn.Module, args, output) -> None:
            states = getattr(local, "states", None)
            if states is None:  # a thread with no Lynx call running
                return
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            states[slot] = hidden[:, -1]
            if slot == 0:
                local.forwards += 1

        return hook

    def forwards(self) -> int:
        """Forwards of the model this thread has run while the hooks were on."""
        return getattr(self._local, "forwards", 0)

    def features(self) -> torch.Tensor:
        """This thread's captured layers concatenated, `[batch, sum(hidden)]`, on the probe's device."""
        states = getattr(self._local, "states", None)
        if states is None or any(s is None for s in states):
            raise UnsupportedGenerationError(
                "Lynx found no hidden states from this generate call's forward: the model ran no forward through "
                "its decoder layers since the last step (a compiled or otherwise hook-free forward is not supported)."
            )
        device = self.device or states[0].device
        return torch.cat([s.to(device) for s in states], dim=-1)


def probe_only_at_cues(device: torch.device) -> bool:
    """Whether steps without a completed cue skip the probe: on a CPU (checking costs nothing there), not on
    accelerators, where the check would make the host wait for the device every step."""
    return asks_host(device)


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
            "use stop mode (stopping_criteria=[lynx], then lynx.answer(out)) with this transformers version."
        )
    return logits


def loop_running(loop: FrameType | None, batch: int) -> torch.Tensor | None:
    """Which rows transformers' decoding loop has not finished yet (`unfinished_sequences` in `_sample`), or None
    where the loop keeps no such flags."""
    running = loop.f_locals.get("unfinished_sequences") if loop is not None else None
    return running if isinstance(running, torch.Tensor) and running.shape == (batch,) else None


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
    (`Lynx.budget`) has no capture tap: its calls never score a cue and exit by the budget only.
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
        self._probe_only_at_cues = probe_only_at_cues(device)
        # Host-side knowledge that lets a step skip its bookkeeping (on a CPU only, where the detector asks the host):
        # no row's cue is waiting for the next token to confirm it, and no row has exited in this call.
        self._no_pending_cue = True
        self.no_exit_yet = self._probe_only_at_cues
        long = dict(dtype=torch.long, device=device)
        self.pending_cue = torch.full((batch,), -1, **long)
        self.pending_start = torch.full((batch,), -1, **long)
        self.pending_score = torch.zeros(batch, dtype=torch.float32, device=device)
        self.exited = torch.zeros(batch, dtype=torch.bool, device=device)
        self.exit_position = torch.full((batch,), -1, **long)
        self.exit_start = torch.full((batch,), -1, **long)
        self.exit_cue = torch.full((batch,), -1, **long)
        self.exit_score = torch.full((batch,), float("nan"), dtype=torch.float32, device=device)
        self.cues_seen = torch.zeros(batch, **long)
        # The thinking budget: per row, generated tokens after which it was inside the thinking block.
        self.max_thinking_tokens = max_thinking_tokens
        self.thinking_tokens = torch.zeros(batch, **long)
        self.by_budget = torch.zeros(batch, dtype=torch.bool, device=device)
        self._tau = torch.tensor(float32_threshold(threshold), dtype=torch.float32, device=device)
        self.consumed_caches: set[int] = set()  # ids of KV caches that `Lynx.answer` already used up
        # Rows drawn for the live audit run as in shadow mode; None (no row drawn) keeps the step path unchanged.
        self.audited = torch.tensor(audited, device=device) if audited is not None and any(audited) else None
        self.audit_settings: dict | None = None  # guarantee, confidence, risk level, rule (set by `Lynx`)
        self.final_ids: torch.Tensor | None = None  # in-stream: the ids the answer stopper saw last
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

    def _score(self, event: torch.Tensor) -> torch.Tensor:
        # Before this call's first captured forward there is no generated token to score (the hooks arrive after the
        # prefill). On a CPU a step without any cue skips the probe (a host check is free there); on accelerators the
        # step stays branchless so that decoding never waits for the host. Without a probe nothing is scored.
        if self.tap is None or self.tap.forwards() == self._start_forwards or (self._probe_only_at_cues and not bool(event.any())):
            return torch.zeros_like(self.pending_score)
        return self.lynx.probe.predict_proba(self.tap.features()).to(event.device, torch.float32)

    def observe(self, input_ids: torch.LongTensor, running: torch.Tensor | None = None) -> torch.Tensor:
        """Consume the token appended since the last step; return this step's exit decisions `[batch]` (bool).

        `running` (`[batch]`, nonzero for rows generate has not finished before this step; default all) keeps rows
        that another criterion already stopped (a stop string, EOS, a criterion of yours) from exiting or counting
        cues on what generate writes after their end (padding, or model tokens where no EOS is set)."""
        length = input_ids.shape[1]
        new = length - self._consumed
        if new == 0:
            return torch.zeros_like(self.exited)
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
        token = input_ids[:, -1]
        cue, start = self.detector.step(self.state, token)
        self._consumed = length
        if self._no_pending_cue and self.state.quiet and self.max_thinking_tokens is None:
            # No event to decide (no cue waited for this token) and no new cue: nothing of the call changes. (The
            # in-stream pending score is only read where a cue is pending, so it may stay as it is.)
            self.pending_cue, self.pending_start = cue, start
            return torch.zeros_like(self.exited)
        self._no_pending_cue = self.state.quiet
        # The cue completed at the previous token; the token just appended says whether its word really ended.
        event_cue = torch.where(self.state.retracted, -1, self.pending_cue)
        event_start = self.pending_start
        event = event_cue >= 0
        if running is not None:
            event = event & running.to(device=event.device, dtype=torch.bool)
        position = length - 2
        if self.mode == "stop":
            score = self._score(event)  # this step's forward fed the cue token: its hidden state is the cue's
        else:
            score = self.pending_score  # scored one step ago, when the cue token's forward ran
            self.pending_score = self._score(cue >= 0)
        self.pending_cue, self.pending_start = cue, start
        decide = event & ~self.exited & (score >= self._tau)
        if self.max_thinking_tokens is not None:
            # A row still thinking after its budget's last token exits there (a confident cue at the same step wins).
            thinking = self.state.in_think if running is None else \
                self.state.in_think & running.to(device=event.device, dtype=torch.bool)
            self.thinking_tokens += thinking.long()
            budget = thinking & (self.thinking_tokens >= self.max_thinking_tokens) & ~self.exited & ~decide
            self.by_budget |= budget
            decide = decide | budget
            position = position + budget.long()  # the budget's last token, one after where a cue event ends
            event_start = torch.where(budget, length, event_start)
        # A row that exited is over: without an EOS criterion transformers keeps writing model tokens (not padding)
        # after a custom criterion stopped it, and their cues must not count. Shadow mode counts every cue.
        if self.shadow:
            self.cues_seen += event.long()
        elif self.audited is None:
            self.cues_seen += (event & ~self.exited).long()
        else:  # audited rows count every cue, as in shadow mode
            self.cues_seen += (event & ~(self.exited & ~self.audited)).long()
        self.exited |= decide
        self.exit_position = torch.where(decide, position, self.exit_position)
        self.exit_start = torch.where(decide, event_start, self.exit_start)
        self.exit_cue = torch.where(decide, event_cue, self.exit_cue)
        self.exit_score = torch.where(decide, score, self.exit_score)
        if self.no_exit_yet:
            self.no_exit_yet = not bool(decide.any())
        return decide

    def acting(self, decide: torch.Tensor) -> torch.Tensor:
        """The rows of `decide` that the plug-in acts on: none in shadow mode, none of the audited rows."""
        if self.shadow:
            return torch.zeros_like(decide)
        return decide if self.audited is None else decide & ~self.audited

    def answered(self) -> list[bool | None]:
        """Per row, whether its forced answer closed (in-stream mode); None in stop mode."""
        return [None] * self.batch

    def records(self) -> list[ExitRecord]:
        """Per-row telemetry of this call."""
        rows = zip(self.exited.tolist(), self.exit_position.tolist(), self.exit_start.tolist(),
                   self.exit_cue.tolist(), self.exit_score.tolist(), self.cues_seen.tolist(), self.answered(),
                   self.by_budget.tolist(),
                   self.audited.tolist() if self.audited is not None else [False] * self.batch)
        return [
            ExitRecord(
                exited=bool(exited) and not self.shadow and not audited, would_exit=bool(exited), position=pos,
                start=start, cue=self.detector.cues[cue] if cue >= 0 and not budget else None,
                score=score if exited and not budget else None, threshold=self.threshold, cues_seen=seen,
                shadow=self.shadow, answered=answered if exited and not self.shadow and not audited else None,
                by_budget=bool(budget), audited=bool(audited),
            )
            for exited, pos, start, cue, score, seen, answered, budget, audited in rows
        ]

    def matches(self, sequences: torch.Tensor) -> bool:
        """Whether `sequences` is this call's output (what generate returned: the ids it saw, possibly with
        trailing steps undone)."""
        seen = self.sequences
        if sequences.shape[0] != seen.shape[0] or not self.prompt_length < sequences.shape[1] <= seen.shape[1]:
            return False
        if int(self.exit_position.max()) >= sequences.shape[1]:
            return False
        return torch.equal(seen[:, : sequences.shape[1]], sequences.to(seen.device))


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

    def _start(self, owner, loop: FrameType | None, input_ids: torch.LongTensor) -> GenerateCall:
        model, mask = loop_context(loop)
        if self.check_list is not None:
            self.check_list(owner)
        call = self.lynx._start_call(self.mode, model, input_ids, mask, self.call_class)
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

"""`Lynx`: a probe bundle (cues, layers, probe, calibration, exit text) bound to its base model.

Hub I/O goes through huggingface_hub's `ModelHubMixin`; the files it reads and writes (config, probe weights,
calibration, the `custom_generate` recipe, the model card) are `bundle_files.py`'s.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import os
import sys
import warnings
from collections import deque
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelHubMixin
from transformers import StoppingCriteria

from .bundle_files import model_card, read_bundle, write_bundle
from .conformal import DEFAULT_GUARANTEE, Calibration, check_guarantee, check_risk_level, check_rule
from .config import LynxConfig, check_base_model
from .cues import CueDetector
from ..errors import CorruptedBundleError, LynxConfigError, NotAttachedError
from .exit import LynxAnswer, answer_after_exit, brace_delta, exit_cut, finished_answer, reusable_cache, vocab_size
from .answers import close_box
from .audit import AuditLog, AuditReport, check_cs_level
from .monitor import ExitRecord, GenerateCall, LastCall, ModelTap
from .plugins import LynxAnswerStopper, LynxExitProcessor, LynxStoppingCriteria, criterion_signature
from .probe import LynxProbe
from .thinking import resolve_thinking, thinking_exit_ids
from .token_ids import id_batch

logger = logging.getLogger(__name__)

# How many recent stop-mode generate calls `Lynx.answer` can match an output against.
ANSWERABLE_CALLS = 8


class Lynx(
    StoppingCriteria,
    ModelHubMixin,
    library_name="lynx-hf",
    tags=["lynx", "early-exit", "reasoning", "conformal-prediction"],
    license="apache-2.0",
    repo_url="https://github.com/lynx-hf/lynx-hf",
    paper_url="https://arxiv.org/abs/2512.05325",
):
    """A calibrated LYNX exit probe for one base model: in `generate`, each row that exits comes back answered.

    `model.generate(**inputs, stopping_criteria=[lynx])` is one call that returns finished outputs: at the first cue
    where the probe is confident, the row's thinking is closed with the bundle's exit text and the model's greedy
    answer follows in the same call (the criterion brings `exit_processor()` into the call it runs in and ends the
    row once its `\\boxed{...}` closes, as `answer_stopper()` does); rows that do not exit think and answer as without
    Lynx. It works the same through `pipeline("text-generation")`, `TextStreamer` / `TextIteratorStreamer` (what is
    streamed is what is returned), `num_return_sequences` and left-padded batches. `lynx.answer(out)` reads those
    answers back without generating again.

    The exact path is `stopping_criteria=[lynx.stopper()]`, then `lynx.answer(out)`: the row halts one token after
    its cue, and `answer` drops the cue word, closes the thinking block and answers greedily, reusing the KV cache:
    the construction the calibration labels were made with. The one call cannot drop the cue (it was already
    sampled): it keeps the cue word and the token that ended it before the exit text, so its answers can differ from
    the exact path's: on the shipped organism, with the same sampled traces up to the exit, they differ on 2.6%
    (arithmetic, 4 of 154 exited rows) and 4.6% (compare, 3 of 65) of exited rows (`benchmarks/one_call.py`). The
    guarantee below is therefore stated for the exact path; the one call answers from a slightly different exit.

    `confidence` c sets the exit threshold from the stored calibration scores: with `guarantee="question"` (the
    default) the share of questions whose exit is premature is at most 1 - c (conformal risk control on the first
    exit). What premature means is the labels the bundle was calibrated with (`bundle_labels(lynx.metadata)`, in
    words by `guarantee_statement`): gold labels, "the exit makes the final answer wrong in at most 1 - c of
    questions"; agreement labels (built without gold answers), "the exit changes the final answer in at most 1 - c
    of questions"; with `guarantee="event"` (the paper's rule) an unsafe cue triggers
    an exit with probability at most 1 - c, so a trace with several unsafe cues is cut wrongly more often than
    1 - c. Both hold on average over calibration sets; `risk_level=alpha` makes them hold with probability at
    least 1 - alpha for this bundle's calibration set (PAC; fewer exits). `rule="paper"` uses the paper's exact
    per-event rule instead of its monotone envelope (the default). Change `lynx.confidence` (and the others) at any
    time without reloading: each `generate` call uses the settings it started with. `shadow=True` never
    intervenes and only records in `last_exits` where it would have exited. `audit_rate=r` checks the guarantee on
    live traffic without labels: each row is audited with probability r (seeded by `audit_seed`), runs as in shadow
    mode, and `lynx.audit()` reports how often the exit would have changed its answer (`lynx_hf.runtime.audit`).

    `max_thinking_tokens=B` caps the thinking: a row that has thought B tokens without a confident cue exits there
    with the same exit text (stop mode: `answer` answers it; in-stream: the model answers in the same call), and
    its record says `by_budget=True`. Budget exits are outside the conformal guarantee (they happen whatever the
    probe thinks); `ThinkingBudgetCriteria(B, tokenizer=...)` is the cap alone, without a probe or bundle.

    Which model: `Lynx.from_pretrained(repo, model=model)` (or `lynx.attach(model)`) binds it explicitly; without
    it, the first `generate` call that uses one of its plug-ins attaches it to the model running that call (found
    from transformers' decoding loop), with the tokenizer loaded from `model.name_or_path` (else the bundle's base
    model id), and it follows that model if later used by another one. An explicitly attached `Lynx` used in
    another model's `generate` raises an error instead of reading the wrong hidden states.

    Example:

    ```python
    >>> from lynx_hf import Lynx, organism
    >>> model, tok = organism.load()
    >>> lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, confidence=0.9)   # attaches to the model it runs with
    >>> problem = organism.problems("arithmetic", "test", n=2)[1]
    >>> inputs = tok(organism.prompt(tok, problem["question"]), return_tensors="pt")
    >>> out = model.generate(**inputs, stopping_criteria=[lynx], max_new_tokens=300, do_sample=False)
    >>> lynx.last_exits[0].exited
    True
    >>> print(tok.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)[-59:])
    So the answer is 7.
    Wait,
    </think>
    <BLANKLINE>
    Final Answer: \\boxed{7}
    >>> lynx.answer(out)[0].answer      # read from the output, not generated again
    '7'
    >>> exact = model.generate(**inputs, stopping_criteria=[lynx.stopper()], max_new_tokens=300, do_sample=False)
    >>> lynx.answer(exact)[0].answer    # the exact path: halted after the cue, answered with the cue dropped
    '7'

    ```
    """

    def __init__(
        self,
        config: LynxConfig,
        probe: LynxProbe,
        calibration: Calibration,
        *,
        confidence: float = 0.9,
        guarantee: str = DEFAULT_GUARANTEE,
        risk_level: float | None = None,
        rule: str = "envelope",
        shadow: bool = False,
        max_thinking_tokens: int | None = None,
        metadata: dict | None = None,
        audit_rate: float = 0.0,
        audit_seed: int = 0,
    ):
        if probe is not None and probe.input_size != config.feature_size:
            raise CorruptedBundleError(
                f"The probe reads {probe.input_size} features but the config's layers {config.layers} x hidden size "
                f"{config.hidden_size} give {config.feature_size}; re-save the bundle from matching parts."
            )
        self.config = config
        self.probe = probe.eval() if probe is not None else None
        self.calibration = calibration
        self.metadata = dict(metadata or {})
        self.shadow = shadow
        self._guarantee = check_guarantee(guarantee)
        self._confidence = _check_confidence(confidence)
        self._risk_level = check_risk_level(risk_level)
        self._rule = check_rule(rule)
        self._max_thinking_tokens = _check_budget(max_thinking_tokens)
        self._audit_rate = 0.0
        self.audit_rate = audit_rate
        self._audit_seed = _check_audit_seed(audit_seed)
        self._audit_log = AuditLog()
        self._threshold: float | None = None
        self.model = None
        self.tokenizer = None
        self.detector: CueDetector | None = None
        self.exit_ids: list[int] = []
        self.thinking = None  # the ThinkingFormat chosen at attach time
        self._tap: ModelTap | None = None
        self._device: torch.device | None = None  # where the bound model is (and the cue tables, probe, capture)
        self._auto_attached = False
        self._default_tokenizer = None  # the tokenizer to bind with on first use, where one was given without a model
        self._stopper = LynxStoppingCriteria(self)
        self._processor = LynxExitProcessor(self)
        # Recent calls, so that `answer(outputs)` finds the call that produced `outputs`.
        self._stop_calls: deque[GenerateCall] = deque(maxlen=ANSWERABLE_CALLS)
        self._last_call = LastCall()

    def __repr__(self) -> str:
        """What this is, in one line: the base model, the guarantee and its settings, the threshold they give, the
        mode (exit, shadow, audited share), any thinking budget, and what it is attached to."""
        parts = [f"base_model={self.config.base_model!r}", f"guarantee={self._guarantee!r}",
                 f"confidence={self._confidence:g}", f"risk_level={self._risk_level!r}"]
        if self._rule != "envelope":
            parts.append(f"rule={self._rule!r}")
        threshold = self._threshold
        if threshold is None and self.calibration is not None:
            try:  # without caching it or warning here: the first generate call warns where it matters
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    threshold = self.calibration.threshold(self._confidence, self._guarantee, rule=self._rule,
                                                           risk_level=self._risk_level)
            except Exception:  # noqa: BLE001 - a repr never raises
                threshold = None
        parts.append("threshold=" + (f"{threshold:.4g}" if threshold is not None else "?"))
        parts.append(f"mode={'shadow' if self.shadow else 'exit'!r}")
        if self._audit_rate > 0:
            parts.append(f"audit_rate={self._audit_rate:g}")
        if self._max_thinking_tokens is not None:
            parts.append(f"max_thinking_tokens={self._max_thinking_tokens}")
        parts.append("attached to " + _describe_model(self.model, self._device) if self.model is not None
                     else "not attached")
        return f"Lynx({', '.join(parts)})"

    # ----- confidence and thresholds -------------------------------------------------------------------------
    @property
    def confidence(self) -> float:
        """The user confidence c in (0, 1); the premature-exit rate is at most 1 - c."""
        return self._confidence

    @confidence.setter
    def confidence(self, value: float) -> None:
        self._confidence = _check_confidence(value)
        self._threshold = None

    @property
    def guarantee(self) -> str:
        """`"question"` (default: per question, first exit) or `"event"` (per cue event, the paper's rule)."""
        return self._guarantee

    @guarantee.setter
    def guarantee(self, value: str) -> None:
        self._guarantee = check_guarantee(value)
        self._threshold = None

    @property
    def risk_level(self) -> float | None:
        """None (the guarantee holds on average over calibration sets) or alpha: it holds with probability >= 1 - alpha
        for this calibration set (PAC)."""
        return self._risk_level

    @risk_level.setter
    def risk_level(self, value: float | None) -> None:
        self._risk_level = check_risk_level(value)
        self._threshold = None

    @property
    def rule(self) -> str:
        """Per-event threshold rule: `"envelope"` (default, monotone in confidence) or `"paper"` (the paper's exact rule)."""
        return self._rule

    @rule.setter
    def rule(self, value: str) -> None:
        self._rule = check_rule(value)
        self._threshold = None

    @property
    def max_thinking_tokens(self) -> int | None:
        """The thinking budget B (None: no cap): a row still thinking after B tokens exits there, outside the
        guarantee."""
        return self._max_thinking_tokens

    @max_thinking_tokens.setter
    def max_thinking_tokens(self, value: int | None) -> None:
        self._max_thinking_tokens = _check_budget(value)

    @property
    def audit_rate(self) -> float:
        """Share of rows audited (0: none, the default, which costs nothing): each row of each `generate` call is
        drawn with this probability when the call starts, runs as in shadow mode (never exits), and is checked by
        `audit()` once its full trace exists."""
        return self._audit_rate

    @audit_rate.setter
    def audit_rate(self, value: float) -> None:
        value = _check_audit_rate(value)
        if value > 0 and self.probe is None:
            raise LynxConfigError("A budget-only Lynx (ThinkingBudgetCriteria) has no probe and no guarantee to audit: audit a "
                                  "bundle loaded with Lynx.from_pretrained(..., audit_rate=...).")
        self._audit_rate = value

    @property
    def audit_seed(self) -> int:
        """Seed of the audit draws: the k-th call since this `Lynx` was made (or `reset_audit()`) draws its rows with
        `numpy.random.default_rng((audit_seed, k))`."""
        return self._audit_seed

    @audit_seed.setter
    def audit_seed(self, value: int) -> None:
        self._audit_seed = _check_audit_seed(value)

    @property
    def audit_log(self) -> AuditLog:
        """The audited rows of all calls (all threads) so far; assign an `AuditLog.load(path)` to continue one."""
        return self._audit_log

    @audit_log.setter
    def audit_log(self, log: AuditLog) -> None:
        if not isinstance(log, AuditLog):
            raise TypeError(f"audit_log must be an AuditLog (e.g. AuditLog.load(path)), got {type(log).__name__}.")
        self._audit_log = log

    def audit(self, *, cs_level: float = 0.95, alpha: float | None = None) -> AuditReport:
        """Check the guarantee on the audited rows so far: per setting, how often the exit changed the row's answer
        against δ, with an anytime-valid confidence sequence at level `cs_level` (valid however often you look) and
        a verdict. Checks the finished calls not checked yet (`answer(out)` checks its own call's rows).

        Args:
            cs_level: coverage of the confidence sequences (default 0.95). Not the PAC `risk_level` of the threshold,
                which is a property of the calibration.
            alpha: deprecated, `1 - cs_level` (FutureWarning).

        Returns:
            An `AuditReport` (print it for a table).
        """
        level = check_cs_level(cs_level, alpha)
        self._audit_log.settle()
        return self._audit_log.report(cs_level=level, max_unsafe=self.calibration.max_unsafe_per_question)

    def reset_audit(self) -> None:
        """Forget the audited rows (and calls not yet checked) and restart the audit draws."""
        self._audit_log = AuditLog()

    @property
    def threshold(self) -> float:
        """The probe-score threshold for the current confidence, guarantee, risk level and rule (inf: never exit;
        always for a budget-only `Lynx`)."""
        if self.calibration is None:
            return math.inf
        if self._threshold is None:
            self._threshold = self.calibration.threshold(self._confidence, self._guarantee, rule=self._rule,
                                                         risk_level=self._risk_level)
        return self._threshold

    # ----- binding to a model ----------------------------------------------------------------------------------
    def attach(self, model, tokenizer=None, *, allow_base_model_mismatch: bool = False) -> "Lynx":
        """Bind to `model` and its tokenizer; returns self, usable as a context manager.

        `tokenizer` defaults to `AutoTokenizer.from_pretrained(model.name_or_path)`. No hook is placed on the model
        here: the capture hooks exist only while a `generate` call that uses this bundle runs.
        """
        self._bind(model, tokenizer, allow_base_model_mismatch=allow_base_model_mismatch)
        self._auto_attached = False
        return self

    def _bind(self, model, tokenizer=None, *, allow_base_model_mismatch: bool = False) -> None:
        if tokenizer is None:
            tokenizer = _tokenizer_for(model, self.config.base_model)
        problems = [] if self.probe is None else \
            check_base_model(self.config, model, tokenizer, allow_mismatch=allow_base_model_mismatch)
        if problems:
            logger.warning("Using a probe for %s on a different model (%s): its guarantee may not hold.",
                           self.config.base_model, "; ".join(problems))
        device = _model_device(model)
        config = self.config
        thinking = resolve_thinking(tokenizer, config.think_start, config.think_end, config.exit_text, config.thinking)
        config.think_start, config.think_end, config.exit_text = \
            thinking.think_start, thinking.think_end, thinking.exit_text
        missing = self._cue_detector(tokenizer, device).missing_cues()
        if missing:
            raise LynxConfigError(
                f"The tokenizer cannot spell the cue(s) {missing}: give a bundle whose cues this tokenizer encodes, "
                "or train one with cues it can spell (`lynx-hf collect --cues ...`)."
            )
        self.exit_ids = thinking_exit_ids(tokenizer, thinking)
        self.thinking = thinking
        self.model, self.tokenizer = model, tokenizer
        self._place(device)

    def _place(self, device: torch.device) -> None:
        """Put what decoding reads every step (probe, cue tables, brace logits, captured states) on `device`, the
        bound model's device."""
        self.detector = self._cue_detector(self.tokenizer, device)
        self.brace_delta = brace_delta(self.tokenizer, vocab_size(self.model)).to(device)
        self._device = device
        if self.probe is not None:
            self.probe.to(device)
            self._tap = ModelTap(self.model, self.config.layers, device=device)

    def _cue_detector(self, tokenizer, device: torch.device) -> CueDetector:
        """The cue detector for this bundle's cues and thinking markers, its tables on `device` (built once per
        tokenizer and device, then shared)."""
        c = self.config
        return CueDetector.for_tokenizer(tokenizer, cues=c.cues, think_start=c.think_start, think_end=c.think_end,
                                         device=device)

    def detach(self) -> None:
        """Unbind from the model (a later `generate` call that uses this bundle attaches it again)."""
        self._tap = None
        self._device = None
        self.model = None

    def __enter__(self) -> "Lynx":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def _start_call(self, mode: str, model, input_ids: torch.LongTensor, attention_mask, call_class=GenerateCall,
                    *, confidence: float | None = None, guarantee: str | None = None, shadow: bool | None = None,
                    risk_level: float | None = None, rule: str | None = None,
                    max_thinking_tokens: int | None = None) -> GenerateCall:
        """A new `generate` call of `model` uses one of this bundle's plug-ins: bind to `model` if needed, and start
        the call's own state with the settings in force now (or the given per-call overrides)."""
        if self.model is None:
            self._bind(model, self._default_tokenizer)
            self._auto_attached = True
        elif self.model is not model and not _wraps(self.model, model):
            if not self._auto_attached:
                raise NotAttachedError(
                    f"This Lynx is attached to another model object ({type(self.model).__name__} at "
                    f"{id(self.model):#x}) than the one running this generate call ({type(model).__name__} at "
                    f"{id(model):#x}), so it would read the wrong hidden states. Call lynx.attach(model) with the "
                    "generating model (e.g. after reloading it), or load the bundle without model= to let it "
                    "follow the model it is used with."
                )
            tokenizer = self.tokenizer if _name(model) == _name(self.model) else None
            self._bind(model, tokenizer)
        elif _model_device(model) != self._device:  # moved since it was bound, e.g. `model.to("cuda")`
            self._place(_model_device(model))
        if (confidence is None and guarantee is None and risk_level is None and rule is None) \
                or self.calibration is None:
            threshold = self.threshold
        else:
            threshold = self.calibration.threshold(
                _check_confidence(self._confidence if confidence is None else confidence),
                check_guarantee(self._guarantee if guarantee is None else guarantee),
                rule=check_rule(self._rule if rule is None else rule),
                risk_level=check_risk_level(self._risk_level if risk_level is None else risk_level),
            )
        budget = self._max_thinking_tokens if max_thinking_tokens is None else _check_budget(max_thinking_tokens)
        audited = None
        if self._audit_rate > 0:
            audited = self._audit_log.draw(input_ids.shape[0], self._audit_rate, self._audit_seed)
        call = call_class(self, mode, model, input_ids, attention_mask, threshold=threshold,
                          shadow=self.shadow if shadow is None else bool(shadow), max_thinking_tokens=budget,
                          audited=audited)
        if call.audited is not None:
            call.audit_settings = dict(
                guarantee=self._guarantee if guarantee is None else guarantee,
                confidence=float(self._confidence if confidence is None else confidence),
                risk_level=self._risk_level if risk_level is None else risk_level,
                rule=self._rule if rule is None else rule)
            self._audit_log.track(call)
        self._stop_calls.append(call)  # every call is answerable (an in-stream one's answers are already there)
        self._last_call.set(call)
        return call

    # ----- copies and pickles ------------------------------------------------------------------------------
    def __copy__(self) -> "Lynx":
        """A new `Lynx` sharing this one's config, probe and calibration, with the same settings and binding (model
        and tokenizer) but its own plug-ins and no call history (a plain attribute copy would keep using this
        bundle's plug-ins, settings and records)."""
        return self._replica(self.config, self.probe, self.calibration, copy.copy(self.metadata))

    def __deepcopy__(self, memo: dict) -> "Lynx":
        """Like `copy.copy`, with the config, probe and calibration copied too; the model and tokenizer it is bound
        to are shared, never copied."""
        return self._replica(copy.deepcopy(self.config, memo), copy.deepcopy(self.probe, memo),
                             copy.deepcopy(self.calibration, memo), copy.deepcopy(self.metadata, memo))

    def _replica(self, config: LynxConfig, probe: LynxProbe, calibration: Calibration, metadata: dict) -> "Lynx":
        new = type(self)(config, probe, calibration, confidence=self._confidence, guarantee=self._guarantee,
                         risk_level=self._risk_level, rule=self._rule, shadow=self.shadow,
                         max_thinking_tokens=self._max_thinking_tokens, metadata=metadata,
                         audit_rate=self._audit_rate, audit_seed=self._audit_seed)
        if self.model is not None:
            new.model, new.tokenizer, new.detector = self.model, self.tokenizer, self.detector
            new.thinking = self.thinking
            new.exit_ids, new.brace_delta = list(self.exit_ids), self.brace_delta
            new._device = self._device
            if probe is not None:
                new._tap = ModelTap(self.model, config.layers, device=self._device)
            new._auto_attached = self._auto_attached
        return new

    def __reduce__(self):
        """Pickled: the bundle (config, probe, calibration, metadata) and its settings; not the model binding or the
        call history, so an unpickled `Lynx` attaches on first use like one loaded without `model=`."""
        options = dict(confidence=self._confidence, guarantee=self._guarantee, risk_level=self._risk_level,
                       rule=self._rule, shadow=self.shadow, max_thinking_tokens=self._max_thinking_tokens,
                       metadata=self.metadata, audit_rate=self._audit_rate, audit_seed=self._audit_seed)
        return _unpickle, (type(self), self.config, self.probe, self.calibration, options)

    # ----- generate plug-ins --------------------------------------------------------------------------------
    def stopper(self) -> LynxStoppingCriteria:
        """The exact stop-then-answer path: a criterion that halts each row one token after its confident cue.

        Then `lynx.answer(out)` drops the cue, closes the thinking block with the exit text and lets the model answer
        greedily, reusing the KV cache where that is exact: the construction the calibration labels were made with,
        and the one the guarantee is stated for. (`stopping_criteria=[lynx]` instead answers in the same call.)

        Returns:
            The bundle's `LynxStoppingCriteria` (the same object on every call).

        Example:

        ```python
        >>> from lynx_hf import Lynx, organism
        >>> model, tok = organism.load()
        >>> lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok)
        >>> inputs = tok(organism.prompt(tok, "Tom has 3 apples and buys 4 more. How many?"), return_tensors="pt")
        >>> out = model.generate(**inputs, stopping_criteria=[lynx.stopper()], max_new_tokens=300)
        >>> answers = lynx.answer(out)   # the exited rows answered after the exact exit
        >>> len(answers)
        1

        ```
        """
        return self._stopper

    def stopping_criteria(self) -> LynxStoppingCriteria:
        """Deprecated name of `stopper()` (the stop-mode criterion); it warns and returns the same object.

        Returns:
            `self.stopper()`.
        """
        warnings.warn("lynx.stopping_criteria() is deprecated: use lynx.stopper() (the same stop-mode criterion; "
                      "stopping_criteria=[lynx] now answers in the same call).", FutureWarning, stacklevel=2)
        return self._stopper

    def exit_processor(self) -> LynxExitProcessor:
        """The in-stream plug-in: forces the exit text at a confident cue, then lets the model answer."""
        return self._processor

    def answer_stopper(self) -> LynxAnswerStopper:
        """Stops rows that `exit_processor()` made exit once their boxed answer closes."""
        return LynxAnswerStopper(self._processor)

    @criterion_signature
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        """`stopping_criteria=[lynx]`: exit at a confident cue and answer in the same `generate` call.

        On its first step in a call the criterion brings `exit_processor()` into that call's logits processors
        (appended last; see `LynxExitProcessor.joined_step`), then ends each exited row once its boxed answer
        closes, as `answer_stopper()` does. Passing `logits_processor=[lynx.exit_processor()]` too is the same
        call (nothing is forced twice).
        """
        return self._processor.joined_step(input_ids, sys._getframe(1))

    @property
    def last_exits(self) -> list[ExitRecord]:
        """Per-row telemetry of the last `generate` call that used one of this bundle's plug-ins in this thread (in a
        thread that ran none: in any thread), so threads sharing one `Lynx` each read their own call's records."""
        call = self._last_call.get()
        return [] if call is None else call.records()

    def _call_of(self, sequences: torch.Tensor) -> GenerateCall:
        # The tensor generate returned is the one its criteria saw last: that names the call even where a later
        # call wrote the same ids. A copy (`out.cpu()`, `out.tolist()`) is matched by its ids, the latest call first.
        for call in reversed(self._stop_calls):
            if sequences is call.sequences or sequences is call.final_ids:
                return call
        for call in reversed(self._stop_calls):
            if call.matches(sequences):
                return call
        raise ValueError(
            f"answer() got sequences of shape {tuple(sequences.shape)} that none of this Lynx's last "
            f"{ANSWERABLE_CALLS} generate calls produced. Pass the unchanged output of "
            "model.generate(..., stopping_criteria=[lynx]) or of stopping_criteria=[lynx.stopper()] (a tensor or the "
            "return_dict_in_generate output)."
        )

    @torch.no_grad()
    def answer(self, outputs, max_new_tokens: int | None = None) -> list[LynxAnswer]:
        """Final answers after a stop-mode `generate`: exited rows get the exact exit (cue dropped, exit text
        appended, greedy answer); the others' answers are read from their own text.

        `outputs` is what `generate` returned: a tensor (or its ids as nested lists or a NumPy array), or a
        `GenerateDecoderOnlyOutput` from `return_dict_in_generate=True`, whose KV cache is then reused where that
        is exact (a full-attention `DynamicCache` in the model's dtype, as generate left it) and consumed. The
        exits, prompt mask and model are those of the call that produced `outputs` (found among this bundle's
        recent calls), and so are its tokenizer and exit text, whatever ran since; calling it again gives the same
        answers (a consumed or since-changed cache is recomputed, with a warning). `max_new_tokens` caps the answer
        (default: the bundle's `answer_max_new_tokens`).

        Returns:
            One `LynxAnswer` per row, with one meaning for exited and non-exited rows: `text` is the final response
            after the thinking block, `full_text` the whole generation as answered (thinking included), `answer`
            the boxed answer.
        """
        integral = isinstance(max_new_tokens, numbers.Integral) and not isinstance(max_new_tokens, bool)
        if max_new_tokens is not None and not (integral and max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: give a positive number of answer tokens, or None "
                             f"for the bundle's {self.config.answer_max_new_tokens}.")
        sequences = _sequences_of(outputs)
        call = self._call_of(sequences)
        if call.mode == "stream":
            return self._answers_in_stream(call, sequences)
        sequences = sequences.to(call.sequences.device)  # e.g. `out.cpu()` or `out.tolist()` of a GPU call
        cache = None
        if not isinstance(outputs, torch.Tensor):
            cache = getattr(outputs, "cache", None) or getattr(outputs, "past_key_values", None)
        if cache is not None and id(cache) in call.consumed_caches:
            warnings.warn("The KV cache in these outputs was consumed by an earlier answer(); recomputing the "
                          "prefix instead (same answers, slower).", stacklevel=3)
            cache = None
        records = call.records()
        results: list[LynxAnswer | None] = [None] * len(records)
        rows = [i for i, r in enumerate(records) if r.exited]
        if rows:
            cuts = [exit_cut(records[i].position, records[i].start, call.exit_construction) for i in rows]
            mask = _generation_mask(call.prompt_mask, sequences, call.prompt_length)
            if cache is not None and not reusable_cache(call.model, cache, sequences.shape[0], max(cuts)):
                cache = None
            if cache is not None and cache.get_seq_length() != sequences.shape[1] - 1:
                warnings.warn(f"The KV cache in these outputs holds {cache.get_seq_length()} positions where generate "
                              f"left {sequences.shape[1] - 1}: it was changed after generate returned it (e.g. "
                              "passed to another generate call); recomputing the prefix instead (same answers, "
                              "slower).", stacklevel=3)
                cache = None
            if cache is not None:
                call.consumed_caches.add(id(cache))
                if len(rows) != sequences.shape[0]:
                    cache.batch_select_indices(torch.tensor(rows, device=sequences.device))
            answered = answer_after_exit(
                call.model, call.tokenizer, sequences[rows], cuts, call.exit_ids, attention_mask=mask[rows],
                past_key_values=cache,
                max_new_tokens=int(max_new_tokens) if max_new_tokens is not None else self.config.answer_max_new_tokens,
            )
            for i, cut, a in zip(rows, cuts, answered):
                # the row's generation as answered: its thinking up to the cut, the exit text, the answer
                generation = sequences[i, call.prompt_length:cut].tolist() + list(call.exit_ids) + a.token_ids
                results[i] = finished_answer(call.tokenizer, generation, call.think_end, token_ids=a.token_ids,
                                             answer=a.answer, confidence=a.confidence)
        for i, r in enumerate(results):
            if r is None:
                results[i] = finished_answer(call.tokenizer, sequences[i, call.prompt_length:].tolist(), call.think_end)
        if call.audited is not None:
            self._audit_log.settle(call)
        return results

    def _answers_in_stream(self, call: GenerateCall, sequences: torch.Tensor) -> list[LynxAnswer]:
        """`answer` on the output of an in-stream call (`stopping_criteria=[lynx]`): each exited row's answer is the
        one it already holds after its exit text (read, not generated again); the other rows' as in stop mode."""
        from .exit import _truncate_at_close, eos_token_ids

        eos = eos_token_ids(call.model, call.tokenizer)
        delta = brace_delta(call.tokenizer, vocab_size(call.model))  # (cached per tokenizer)
        exit_ids, n_exit = list(call.exit_ids), len(call.exit_ids)
        results = []
        for row, record in zip(sequences.tolist(), call.records()):
            start = None
            if record.exited:  # the exit text starts within two tokens after the cue (one after a budget exit)
                start = next((i + n_exit for i in range(record.position + 1, min(record.position + 3, len(row)))
                              if row[i:i + n_exit] == exit_ids), None)
            if start is None:
                results.append(finished_answer(call.tokenizer, row[call.prompt_length:], call.think_end))
                continue
            ids = _truncate_at_close(row[start:], delta, eos)
            answer = close_box(call.tokenizer.decode(ids, skip_special_tokens=True))
            # the row's generation as answered: its thinking, the exit text, the answer
            results.append(finished_answer(call.tokenizer, row[call.prompt_length:start] + ids, call.think_end,
                                           token_ids=ids, answer=answer))
        if call.audited is not None:
            self._audit_log.settle(call)
        return results

    # ----- persistence ------------------------------------------------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        if self.probe is None:
            raise LynxConfigError("A budget-only Lynx (ThinkingBudgetCriteria) has no probe or calibration to save: save a "
                                  "bundle built by `lynx-hf build`, and pass max_thinking_tokens= when loading it.")
        write_bundle(save_directory, self.config, self.probe, self.calibration, self.metadata)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str = "Upload Lynx bundle",
        private: bool | None = None,
        token: str | None = None,
        branch: str | None = None,
        create_pr: bool | None = None,
        allow_patterns: list[str] | str | None = None,
        ignore_patterns: list[str] | str | None = None,
        delete_patterns: list[str] | str | None = None,
        model_card_kwargs: dict | None = None,
        **kwargs,
    ) -> str:
        """Upload the bundle (what `save_pretrained` writes, with the model card rendered for `repo_id`) in one commit.

        huggingface_hub's own upload path (`ModelHubMixin.push_to_hub` -> `HfApi.upload_folder`). `branch` is the
        revision to push to (default `main`; created from `main` if it does not exist, unless `create_pr=True`,
        which opens a pull request against it instead); `private` applies when the repo is created; `token` defaults
        to the logged-in one. Returns the commit URL.
        """
        if branch is not None and branch != "main" and not create_pr:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
            repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
            api.create_branch(repo_id=repo_id, branch=branch, exist_ok=True)
        card_kwargs = {"repo_id": repo_id, **(model_card_kwargs or {})}
        return super().push_to_hub(
            repo_id, commit_message=commit_message, private=private, token=token, branch=branch, create_pr=create_pr,
            allow_patterns=allow_patterns, ignore_patterns=ignore_patterns, delete_patterns=delete_patterns,
            model_card_kwargs=card_kwargs, **kwargs,
        )

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """The model card rendered from `hub_cards/lynx_probe.md`, with YAML metadata: the guarantee types, the data
        the calibration rests on, and thresholds and held-out results as tables of rounded numbers."""
        return model_card(self.config, self.calibration, self.metadata, self._hub_mixin_info, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        model=None,
        tokenizer=None,
        confidence: float = 0.9,
        guarantee: str = DEFAULT_GUARANTEE,
        risk_level: float | None = None,
        rule: str = "envelope",
        shadow: bool = False,
        max_thinking_tokens: int | None = None,
        audit_rate: float = 0.0,
        audit_seed: int = 0,
        allow_base_model_mismatch: bool = False,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> "Lynx":
        """Load a bundle from a local folder or a Hub repo id, and attach it to `model` if given.

        Raises a clear error for a missing or corrupted file, a probe for another base model (overridable with
        `allow_base_model_mismatch=True`, except a hidden-size mismatch), a tokenizer that cannot spell a cue, or a
        confidence outside (0, 1).
        """
        config, probe, calibration, metadata = read_bundle(
            pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir, force_download=force_download,
            local_files_only=local_files_only, token=token)
        lynx = cls(config, probe, calibration, confidence=confidence, guarantee=guarantee, risk_level=risk_level,
                   rule=rule, shadow=shadow, max_thinking_tokens=max_thinking_tokens, metadata=metadata,
                   audit_rate=audit_rate, audit_seed=audit_seed)
        if model is not None:
            lynx.attach(model, tokenizer, allow_base_model_mismatch=allow_base_model_mismatch)
        return lynx

    @classmethod
    def budget(cls, max_thinking_tokens: int, *, model=None, tokenizer=None, thinking: str | None = None,
               think_start: str | None = None, think_end: str | None = None, exit_text: str | None = None,
               shadow: bool = False):
        """Deprecated: use `ThinkingBudgetCriteria(max_thinking_tokens, tokenizer=...)`, which this returns.

        The thinking budget alone (no probe, no bundle, no guarantee) is its own stopping criterion, not a `Lynx`.
        """
        warnings.warn("Lynx.budget(...) is deprecated: use ThinkingBudgetCriteria(max_thinking_tokens, tokenizer=...) "
                      "(from lynx_hf import ThinkingBudgetCriteria), which it returns.", FutureWarning, stacklevel=2)
        from .. import ThinkingBudgetCriteria

        return ThinkingBudgetCriteria(max_thinking_tokens, model=model, tokenizer=tokenizer, thinking=thinking,
                                      think_start=think_start, think_end=think_end, exit_text=exit_text,
                                      shadow=shadow)


def _unpickle(cls, config: LynxConfig, probe: LynxProbe, calibration: Calibration, options: dict) -> Lynx:
    return cls(config, probe, calibration, **options)


def _check_budget(value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise LynxConfigError(
            f"max_thinking_tokens={value!r}: give a positive number of thinking tokens (e.g. 4096), or None for no cap."
        )
    return int(value)


def _check_confidence(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise LynxConfigError(
            f"confidence must be a number in (0, 1), got {value!r} ({type(value).__name__}): pass e.g. confidence=0.9."
        )
    value = float(value)
    if not 0.0 < value < 1.0:
        raise LynxConfigError(
            f"confidence={value} is outside (0, 1): pass e.g. confidence=0.9 for a premature-exit rate of at most 10%."
        )
    return value


def _check_audit_rate(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise LynxConfigError(f"audit_rate must be a share of rows in [0, 1], got {value!r}: pass e.g. "
                              "audit_rate=0.05 to audit one row in twenty, or 0 to audit none.")
    return float(value)


def _check_audit_seed(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise LynxConfigError(f"audit_seed must be an integer, got {value!r}: pass e.g. audit_seed=0.")
    return int(value)


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def _describe_model(model, device) -> str:
    name = _name(model)
    return f"{type(model).__name__}" + (f"({name!r})" if name else "") + (f" on {device}" if device is not None else "")


def _wraps(outer, inner) -> bool:
    """Whether `inner` is a submodule of `outer`, e.g. the transformers model inside a `PeftModel`, whose `generate`
    runs the inner model's decoding loop on the same layers."""
    return isinstance(outer, torch.nn.Module) and any(m is inner for m in outer.modules())


def _name(model) -> str | None:
    return getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)


def _tokenizer_for(model, base_model: str | None = None):
    """The tokenizer of `model.name_or_path`, else of the bundle's base model id."""
    from transformers import AutoTokenizer

    names = [n for n in dict.fromkeys([_name(model), base_model]) if n]
    errors = []
    for name in names:
        try:
            return AutoTokenizer.from_pretrained(name)
        except Exception as error:  # noqa: BLE001 - any failure means the same fix
            errors.append(f"{name!r}: {error.__class__.__name__}")
    raise LynxConfigError(
        f"Could not load a tokenizer for this model (tried {', '.join(errors) or 'no name: the model has no name_or_path'}); "
        "attach it explicitly: Lynx.from_pretrained(repo, model=model, tokenizer=tokenizer) or lynx.attach(model, tokenizer)."
    )


def _sequences_of(outputs) -> torch.Tensor:
    """The `[B, T]` token ids of a `generate` output: a tensor, a `return_dict_in_generate` output, or the same ids
    as nested lists / a NumPy array (e.g. `out.tolist()`)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    sequences = getattr(outputs, "sequences", None)
    if isinstance(sequences, torch.Tensor):
        return sequences
    try:
        ids = id_batch(outputs, "outputs")
    except (TypeError, ValueError, RuntimeError):
        try:
            ids = torch.as_tensor(outputs)
        except (TypeError, ValueError, RuntimeError):
            ids = None
    if ids is None or ids.dim() != 2 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(
            f"answer() takes what model.generate(..., stopping_criteria=[lynx]) returned (a [batch, length] tensor of "
            f"token ids, or its return_dict_in_generate output), got {type(outputs).__name__}"
            + (f" of shape {tuple(ids.shape)} and dtype {ids.dtype}" if ids is not None else "")
            + ": pass the output itself, unchanged."
        )
    return ids.long()


def _generation_mask(prompt_mask: torch.Tensor | None, sequences: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """The attention mask generate used: the prompt's (left padding) followed by ones."""
    mask = torch.ones_like(sequences)
    if prompt_mask is not None and prompt_mask.shape == (sequences.shape[0], prompt_length):
        mask[:, :prompt_length] = prompt_mask.to(mask)
    return mask

"""The two `generate` plug-ins: `LynxStoppingCriteria` (stop mode) and `LynxExitProcessor` (in-stream exit)."""

from __future__ import annotations

import inspect
import sys
import weakref

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria
from transformers.generation import logits_process

from ..errors import UnsupportedGenerationError
from .monitor import (BundleLike, CallTracker, ExitRecord, GenerateCall, caller_list, loop_context, loop_logits,
                      loop_running)


def criterion_signature(call):
    """Show a stopping criterion's `__call__(input_ids, scores, **kwargs)` as `(input_ids, scores)`.

    transformers' `LogitsProcessorList` reads each processor's signature and, for one with more than two parameters,
    raises its own "Make sure that all the required parameters ..." error before calling it. With two, it calls the
    criterion, which then names the mistake and the fix (`refuse_logits_list`). `StoppingCriteriaList` does not read
    signatures, so the criterion still takes `**kwargs` there.
    """
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    call.__signature__ = inspect.Signature([inspect.Parameter(name, kind) for name in ("self", "input_ids", "scores")])
    return call


def refuse_logits_list(owner) -> None:
    """A call's plug-in list check for the stop-mode criteria: they are stopping criteria, not logits processors."""
    if isinstance(owner, LogitsProcessorList):
        raise UnsupportedGenerationError(
            "Lynx is a stopping criterion, not a logits processor (and so are ThinkingBudgetCriteria and "
            "lynx.stopper()): pass stopping_criteria=[lynx]. For the explicit in-stream pair use "
            "logits_processor=[lynx.exit_processor()], stopping_criteria=[lynx.answer_stopper()]."
        )


class LynxStoppingCriteria(StoppingCriteria):
    """Halts a row at the first reflection cue where the probe is confident that exiting is safe.

    At each cue inside the thinking block the probe scores the hidden state of the cue token; once the next token
    shows that the cue word ended, the row stops if the score reaches the conformal threshold for the bundle's
    confidence. The trace then ends one token after the cue (stop mode); `Lynx.answer(outputs)` drops the cue,
    closes the thinking block and lets the model answer. In shadow mode nothing stops and `last_exits` records
    where it would have. Each `generate` call keeps its own state, bound to its output.

    Examples:

    ```python
    >>> from lynx_hf import Lynx, organism
    >>> model, tok = organism.load()
    >>> lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok, confidence=0.9)
    >>> inputs = tok(organism.prompt(tok, "Tom has 3 apples and buys 4 more. How many?"), return_tensors="pt")
    >>> out = model.generate(**inputs, stopping_criteria=[lynx.stopper()], max_new_tokens=200)
    >>> len(lynx.last_exits)
    1

    ```
    """

    def __init__(self, lynx: BundleLike):
        self.lynx = lynx
        self.calls = CallTracker(lynx, mode="stop", check_list=refuse_logits_list)

    @criterion_signature
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return self.step(input_ids, sys._getframe(1))

    def step(self, input_ids: torch.LongTensor, caller) -> torch.BoolTensor:
        """One decoding step of the call that `caller` (the frame calling the plug-in) belongs to."""
        call, loop = self.calls.current_and_loop(input_ids, caller)
        decide = call.acting(call.observe(input_ids, loop_running(loop, input_ids.shape[0])))
        return decide.clone() if decide is call.nothing else decide  # the caller may change what it gets in place

    @property
    def last_exits(self) -> list[ExitRecord]:
        """Per-row telemetry of the last `generate` call that used this plug-in in this thread (else in any thread)."""
        call = self.calls.last
        return [] if call is None else call.records()


# transformers' processors that keep a one-hot forced distribution one-hot (a -inf mask stays -inf, the forced token
# stays the only finite one): the sampling warpers `generate` appends after the user's processors, and the like.
_KEEP_FORCED = tuple(getattr(logits_process, name) for name in (
    "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper", "TopHLogitsWarper",
    "TypicalLogitsWarper", "EpsilonLogitsWarper", "EtaLogitsWarper", "LogitNormalization",
    "WatermarkLogitsProcessor", "SynthIDTextWatermarkLogitsProcessor",
) if hasattr(logits_process, name))


class StreamCall(GenerateCall):
    """A `GenerateCall` of the in-stream plug-in: also forces the exit text and follows the forced answer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        device = self.exited.device
        self.forced_ids = torch.tensor(self.exit_ids, dtype=torch.long, device=device)
        self.brace_delta = self.lynx.brace_delta.to(device)
        self.forcing = torch.full((self.batch,), -1, dtype=torch.long, device=device)
        self.answering = torch.zeros(self.batch, dtype=torch.bool, device=device)
        self.closed = torch.zeros(self.batch, dtype=torch.bool, device=device)
        self.depth = torch.zeros(self.batch, dtype=torch.long, device=device)
        self.loop_running: torch.Tensor | None = None  # generate's unfinished-rows flags at the last step

    def answered(self) -> list[bool | None]:
        return self.closed.tolist()


class LynxExitProcessor(LogitsProcessor):
    """At a confident cue, forces the exit text (e.g. `</think> ... \\boxed{`) token by token, then lets the model answer.

    It decides on the same events as stop mode and the calibration data: a cue whose word the next token ended, scored
    on the cue token's hidden state. As that next token is already sampled when the decision is made, the in-stream
    exit keeps the cue word and that one token before the exit text (stop mode and `Lynx.answer` drop the cue, as
    the labels did). The answer after the exit text is decoded greedily on the model's own logits, as the labels were,
    whatever the call's sampling settings and logits processors (`repetition_penalty`, `suppress_tokens`,
    `sequence_bias`, ... shape the thinking only, as in `Lynx.answer` and `custom_generate`). Pair it with
    `lynx.answer_stopper()` to end each row once its boxed answer closes; a row whose token budget runs out before
    that is recorded with `answered=False`. In shadow mode it never forces anything.
    Put it last among your logits processors (a later one could change the forced tokens, so it is refused);
    transformers' sampling warpers, which `generate` runs after yours, keep the forced token.

    Examples:

    ```python
    >>> from lynx_hf import Lynx, organism
    >>> model, tok = organism.load()
    >>> lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok)
    >>> inputs = tok(organism.prompt(tok, "Tom has 3 apples and buys 4 more. How many?"), return_tensors="pt")
    >>> out = model.generate(**inputs, logits_processor=[lynx.exit_processor()],
    ...                      stopping_criteria=[lynx.answer_stopper()], max_new_tokens=200)
    >>> "Final Answer" in tok.decode(out[0])
    True

    ```
    """

    def __init__(self, lynx: BundleLike):
        self.lynx = lynx
        self.calls = CallTracker(lynx, mode="stream", call_class=StreamCall, check_list=self._check_order)
        self._joined: tuple[weakref.ref, StreamCall] | None = None  # (criteria list, call) of `joined_step`

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        call, loop = self.calls.current_and_loop(input_ids, sys._getframe(1))
        running = loop_running(loop, input_ids.shape[0])
        # The loop's flags as they were before the token just appended (last step's; None: all rows, at the start)
        # and after it: a cue that the row's own EOS confirms is an event, though the row has ended.
        before, call.loop_running = call.loop_running, running
        decide = call.observe(input_ids, before, running)
        if call.no_exit_yet:  # no row forced or answering yet (the host knows it without waiting)
            if decide is call.nothing or call.shadow:  # and none exits now: the scores pass unchanged
                return scores
        else:
            # Rows that finished forcing are answering: track the box's brace depth for the answer stopper, and
            # record a closed box here too, so that `answered` is right without the stopper (a row then writes on
            # after its box).
            last = input_ids[:, -1]
            call.depth = torch.where(call.answering, call.depth + call.brace_delta[last], call.depth)
            call.closed |= call.answering & (call.depth < 0)
            if running is not None:
                # A row that generate ended (a stop string inside the exit text, a criterion of yours) gets padding
                # from now on, not the tokens forced here: it leaves Lynx's control, and its box stays unclosed.
                ended = ~running.to(device=call.forcing.device, dtype=torch.bool)
                call.forcing = torch.where(ended, torch.full_like(call.forcing, -1), call.forcing)
                call.answering = call.answering & ~ended
            if call.shadow:
                return scores
        if call.audited is not None:
            decide = call.acting(decide)
        call.forcing = torch.where(decide, torch.zeros_like(call.forcing), call.forcing)
        forcing = call.forcing >= 0
        # Rows answering decode greedily on the model's own logits, whatever the call's sampling settings and the
        # processors that ran before this one (repetition_penalty, suppress_tokens, sequence_bias, ...): the guarantee
        # is about the greedy answer after the exit text (the labels', `answer`'s and `custom_generate`'s).
        greedy = call.answering & ~call.closed
        n_exit = call.forced_ids.numel()
        model_choice = loop_logits(loop, scores).argmax(dim=-1).to(scores.device)  # sharded: on the last device
        target = torch.where(forcing, call.forced_ids[call.forcing.clamp(0, n_exit - 1)], model_choice)
        forced = torch.full_like(scores, -float("inf")).scatter_(1, target[:, None], 0.0)
        scores = torch.where((forcing | greedy)[:, None], forced, scores)
        advanced = call.forcing + 1
        finished = forcing & (advanced >= n_exit)
        call.answering = call.answering | finished
        # The last exit token (holding the box's `{`) is counted on the next call: start from minus its delta.
        call.depth = torch.where(finished, -call.brace_delta[target], call.depth)
        call.forcing = torch.where(forcing & ~finished, advanced, torch.where(finished, -1, call.forcing))
        return scores

    def _check_order(self, processors) -> None:
        """Refuse processors that run after this one and could change the tokens it forces (a ban on `</think>`
        there would turn the exit text into whatever token the empty distribution yields first)."""
        processors = list(processors)
        index = next((i for i, p in enumerate(processors) if p is self), None)
        if index is None:  # called through a processor of the user's that wraps it: its order is theirs to keep
            return
        later = [type(p).__name__ for p in processors[index + 1:]
                 if not isinstance(p, (*_KEEP_FORCED, LynxExitProcessor))]
        if later:
            raise UnsupportedGenerationError(
                f"The logits processor(s) {later} run after lynx.exit_processor() and could change the exit text it "
                "forces: put lynx.exit_processor() last in logits_processor=[...]."
            )

    def joined_step(self, input_ids: torch.LongTensor, caller) -> torch.BoolTensor:
        """One step of `stopping_criteria=[lynx]`: the in-stream exit joined to the `generate` call it runs in.

        On its first step in a call (step 1: the prompt plus one sampled token) the criterion appends this processor
        to the decoding loop's own `logits_processor` list, last, and starts the call's state from the prompt, as
        the processor would have on its own first step; from then on it is that call's answer stopper. No exit can
        be decided before the second generated token (a cue needs the token after it), so joining at step 1 changes
        nothing: the trace, the audit draw and the records are those of
        `logits_processor=[lynx.exit_processor()], stopping_criteria=[lynx.answer_stopper()]`.

        Why this holds across transformers 5.x: the greedy/sampling loop (`GenerationMixin._sample`) is handed one
        `LogitsProcessorList` (`logits_processor`) and one `StoppingCriteriaList` (`stopping_criteria`), built
        fresh by `generate` for each call, and calls `logits_processor(input_ids, scores)` on that same object every
        step, which iterates the list anew each time; the plug-ins already read the loop's frame for `self`,
        `model_kwargs`, `outputs` and `unfinished_sequences`. A list appended to during the call is therefore
        called with the new processor from the next step on, and is dropped with the call. `tests/test_one_call.py`
        pins each of these facts, so a transformers release that changes them fails there, not silently.
        """
        found = caller_list(caller)
        if found is None:
            raise UnsupportedGenerationError(
                "Lynx used as a stopping criterion must run inside model.generate(..., stopping_criteria=[lynx]); to "
                "decode with your own loop use the custom_generate recipe shipped in the bundle."
            )
        owner, loop = found
        joined = self._joined
        if joined is not None and joined[0]() is owner:
            call = joined[1]
        else:
            call = self.calls.lookup(owner)
            if call is None:
                call = self._join(owner, loop, input_ids)
            self._joined = (weakref.ref(owner), call)
        if call.batch != input_ids.shape[0] or call._consumed != input_ids.shape[1] - 1:
            raise UnsupportedGenerationError(
                f"Lynx expected one new token per row per step (its exit processor has read {call._consumed} of "
                f"{input_ids.shape[1]} positions on {call.batch} rows, this step gives {input_ids.shape[0]} rows): "
                "only greedy and sampling decoding through model.generate(...) are supported."
            )
        return _answer_step(call, input_ids)

    def _join(self, criteria, loop, input_ids: torch.LongTensor) -> StreamCall:
        """Bring this processor into the running call's `logits_processor` list and start the call's state."""
        refuse_logits_list(criteria)  # `logits_processor=[lynx]`: it is a stopping criterion
        loop_context(loop)  # refuses beam search, assisted decoding, ... with their own message
        processors = loop.f_locals.get("logits_processor")
        if not isinstance(processors, LogitsProcessorList):
            raise UnsupportedGenerationError(
                "stopping_criteria=[lynx] could not find the logits processors of transformers' decoding loop "
                "(`logits_processor` in `_sample`) to join its exit processor to: use the explicit pair "
                "logits_processor=[lynx.exit_processor()], stopping_criteria=[lynx.answer_stopper()], or stop mode "
                "(stopping_criteria=[lynx.stopper()], then lynx.answer(out))."
            )
        call = self.calls.lookup(processors)
        if call is None:  # (else the user passed logits_processor=[lynx.exit_processor()] too: it already runs)
            others = [p for p in processors if isinstance(p, LynxExitProcessor)]
            if others:
                raise UnsupportedGenerationError(
                    "stopping_criteria=[lynx] brings its own exit processor into the call, and logits_processor=[...] "
                    "already holds another Lynx's exit processor: two bundles would force exits in one call. Use one "
                    "Lynx: drop one of them."
                )
            processors.append(self)
            call = self.calls.start(processors, loop, input_ids[:, :-1])
        self.calls.register(criteria, call)
        return call

    def running_call(self, input_ids: torch.LongTensor) -> StreamCall:
        """This thread's running call, checked to be the one `input_ids` continues."""
        call = self.calls.running_here
        if call is None or call.batch != input_ids.shape[0] or call._consumed != input_ids.shape[1] - 1:
            raise UnsupportedGenerationError(
                "lynx.answer_stopper() only works together with lynx.exit_processor() in the same generate call: "
                "pass logits_processor=[lynx.exit_processor()] too."
            )
        return call

    @property
    def last_exits(self) -> list[ExitRecord]:
        """Per-row telemetry of the last `generate` call that used this plug-in in this thread (else in any thread)."""
        call = self.calls.last
        return [] if call is None else call.records()


class LynxAnswerStopper(StoppingCriteria):
    """Ends a row that `LynxExitProcessor` made exit once the model has closed its `\\boxed{...}` answer.

    Example:

    ```python
    >>> from lynx_hf import Lynx, organism
    >>> model, tok = organism.load()
    >>> lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok)
    >>> stopper = lynx.answer_stopper()
    >>> stopper.processor is lynx.exit_processor()
    True

    ```
    """

    def __init__(self, processor: LynxExitProcessor):
        self.processor = processor

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return _answer_step(self.processor.running_call(input_ids), input_ids)


def _answer_step(call: StreamCall, input_ids: torch.LongTensor) -> torch.BoolTensor:
    """The answer stopper's step: ends the rows whose forced answer's box the token just appended closes."""
    # The full ids (a reference, no copy): what the audit and `Lynx.answer` read, including this last token, which
    # the processor never sees.
    call.final_ids = input_ids
    if call.no_exit_yet:  # (an exit decided at this step is answering only from a later one)
        return call.nothing.clone()  # the caller may change what it gets in place
    done = call.answering & (call.depth + call.brace_delta[input_ids[:, -1]] < 0)
    call.closed |= done
    return done

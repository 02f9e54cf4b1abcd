"""The forced exit: close the thinking block at a cue and let the model answer.

One construction serves label collection, replay and inference, so that what the probe is calibrated on is what
happens at run time. With `"drop_cue"` (the paper's) the prefix ends just before the cue word's first token and
the exit text follows; with `"keep_cue"` (what an in-stream logits processor can do, since the cue was already
sampled) the prefix keeps the cue-completing token.

The answer pass reuses a KV cache of the full sequence instead of re-prefilling each prefix: cached positions at
or after a row's cut are masked out and the exit tokens get the positions they would have had right after the cut,
so every row computes the same function as from `sequence[:cut] + exit_ids`, and rows with different cuts share one
batch. Where masking cannot give that function (sliding-window attention that the sequence outgrows, linear or
hybrid linear-attention layers whose state cannot be masked), each row is answered alone from its own prefix; a
cache that is not a plain full-attention `DynamicCache` (static, quantised, sliding) is never reused.

"Same function" is exact in real arithmetic; in floating point, a cache filled one token at a time and one filled
by a single prefill round differently, which in bfloat16 can flip a greedy choice between near-tied tokens
(`benchmarks/answer_paths.py` measures how often).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
import inspect
import math
from typing import Literal
import weakref

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .answers import close_box, extract_boxed
from .token_ids import id_batch
from ..errors import LynxConfigError

DEFAULT_EXIT_TEXT = "\n</think>\n\nFinal Answer: \\boxed{"
ExitConstruction = Literal["drop_cue", "keep_cue"]
EXIT_CONSTRUCTIONS = ("drop_cue", "keep_cue")


def exit_token_ids(tokenizer, exit_text: str = DEFAULT_EXIT_TEXT) -> list[int]:
    """Token ids of the exit text, checked to decode back to it exactly.

    Example:
        >>> from lynx_hf import organism
        >>> _, tok = organism.load()
        >>> tok.decode(exit_token_ids(tok)) == DEFAULT_EXIT_TEXT
        True
    """
    ids = tokenizer(exit_text, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids)
    if decoded != exit_text:
        raise LynxConfigError(
            f"The tokenizer does not round-trip the exit text {exit_text!r} (decodes to {decoded!r}); "
            "choose an exit text this tokenizer can spell, e.g. one using its own end-of-thinking token."
        )
    return ids


def exit_cut(position: int, start: int, construction: ExitConstruction = "drop_cue") -> int:
    """Length of the prefix kept before the exit text, for a cue word spanning tokens `start..position`."""
    if construction == "drop_cue":
        return start
    if construction == "keep_cue":
        return position + 1
    raise LynxConfigError(f"Unknown exit construction {construction!r}: use one of {EXIT_CONSTRUCTIONS}.")


def exit_prefix(token_ids: Sequence[int], cut: int, exit_ids: Sequence[int]) -> list[int]:
    """`token_ids[:cut] + exit_ids`: the input the model answers from after a forced exit."""
    return list(token_ids[:cut]) + list(exit_ids)


@dataclass
class LynxAnswer:
    """One row's final answer, whether or not it exited (what `Lynx.answer` returns, one per row).

    Attributes:
        token_ids: the greedy answer's ids after the exit text (empty for a row that did not exit: its answer is
            in its own generation).
        text: the final response: the generation after its thinking block (the end-of-thinking marker and special
            tokens removed, leading whitespace stripped); for an exited row, what follows the marker in the exit
            text, then the answer. Empty if the thinking never closed (e.g. cut by `max_new_tokens`).
        answer: the boxed answer (braces matched), None if there is none or it never closed.
        confidence: the model's confidence in an exited row's answer (geometric mean of the greedy tokens'
            probabilities, as DEER uses); NaN for rows that did not exit.
        full_text: the whole decoded generation as answered, thinking included: for an exited row, its thinking
            up to the exit, the exit text and the answer (for `answer_after_exit`, which has no prompt to tell the
            generation by, the exit text and the answer).

    Example:
        >>> a = LynxAnswer(token_ids=[], text="Final Answer: \\boxed{7}", answer="7",
        ...                full_text="<think> 3 + 4 = 7. </think> Final Answer: \\boxed{7}")
        >>> a.answer, a.text in a.full_text
        ('7', True)
    """

    token_ids: list[int]
    text: str
    answer: str | None
    confidence: float = float("nan")
    full_text: str = ""


ExitAnswer = LynxAnswer  # the former name, still importable


def response_text(tokenizer, generation_ids: Sequence[int], think_end: str | None) -> str:
    """The final response in a generation: its text after the last end-of-thinking marker, with special tokens
    removed and leading whitespace stripped ("" if the thinking never closed; all of it if there is no marker).

    Example:
        >>> from lynx_hf import organism
        >>> _, tok = organism.load()
        >>> response_text(tok, tok("Hmm 3 + 4 = 7.</think> So 7.", add_special_tokens=False).input_ids, "</think>")
        'So 7.'
    """
    raw = tokenizer.decode(list(generation_ids), skip_special_tokens=False)
    if think_end:
        if think_end not in raw:
            return ""
        raw = raw.rsplit(think_end, 1)[1]
    for special in sorted(getattr(tokenizer, "all_special_tokens", []) or [], key=len, reverse=True):
        if special and special != think_end:
            raw = raw.replace(special, "")
    return raw.lstrip()


def finished_answer(tokenizer, generation_ids: Sequence[int], think_end: str | None, *,
                    token_ids: Sequence[int] = (), answer: str | None = None,
                    confidence: float = float("nan")) -> LynxAnswer:
    """A `LynxAnswer` from a row's whole generation as answered (`generation_ids`: its generated ids, or for an
    exited row its thinking up to the exit, the exit ids and the answer ids): one construction of `text` and
    `full_text` for exited and non-exited rows. `answer` defaults to the last box of the generation."""
    full_text = tokenizer.decode(list(generation_ids), skip_special_tokens=True)
    return LynxAnswer(token_ids=list(token_ids), text=response_text(tokenizer, generation_ids, think_end),
                      answer=extract_boxed(full_text) if answer is None else answer, confidence=confidence,
                      full_text=full_text)


@torch.no_grad()
def answer_after_exit(
    model,
    tokenizer,
    sequences: torch.LongTensor,
    cuts: Sequence[int] | torch.Tensor,
    exit_ids: Sequence[int],
    *,
    attention_mask: torch.Tensor | None = None,
    past_key_values=None,
    max_new_tokens: int = 16,
    think_end: str | None = "</think>",
) -> list[LynxAnswer]:
    """Greedy-decode each row's answer from `sequences[b, :cuts[b]] + exit_ids`, reusing one KV cache.

    `sequences` is `[B, T]` (a tensor or a list of equally long rows; left padding allowed, given by
    `attention_mask`). `past_key_values`, when given and
    reusable (a full-attention `DynamicCache` of these `B` rows covering at least `max(cuts)` positions, e.g. the
    cache `generate` returns), is consumed (extended and narrowed to the unfinished rows); otherwise one forward over
    `sequences[:, :max(cuts)]` builds a fresh one, or each row is answered alone where masking would not be exact
    (see the module docstring). Decoding stops per row at the box's closing brace or EOS. Each `LynxAnswer`'s
    `text` is what follows `think_end` in the exit text, then the answer.

    Example:
        >>> from lynx_hf import organism
        >>> model, tok = organism.load()
        >>> question = organism.problems("arithmetic", "test", n=1)[0]["question"]
        >>> ids = tok(organism.prompt(tok, question), return_tensors="pt").input_ids
        >>> [a.answer is not None for a in answer_after_exit(model, tok, ids, [ids.shape[1]], exit_token_ids(tok))]
        [True]
    """
    sequences = id_batch(sequences)
    device = sequences.device
    batch = sequences.shape[0]
    cuts = torch.as_tensor(cuts, dtype=torch.long, device=device).reshape(-1)
    if cuts.numel() != batch:
        raise ValueError(f"Got {cuts.numel()} cuts for {batch} sequences: give one cut per row.")
    if attention_mask is None:
        attention_mask = torch.ones_like(sequences)
    attention_mask = id_batch(attention_mask, "attention_mask").to(device=device, dtype=torch.long)
    if past_key_values is not None and not reusable_cache(model, past_key_values, batch, int(cuts.max())):
        past_key_values = None
    if past_key_values is None and _rows_answered_alone(model, int(cuts.max()) + len(exit_ids) + max_new_tokens):
        answers = []
        for row, cut in zip(sequences, cuts.tolist()):
            prefix = row[:cut][attention_mask[len(answers), :cut].bool()][None]
            answers += _answer_batch(model, tokenizer, prefix, torch.tensor([prefix.shape[1]], device=device),
                                     exit_ids, torch.ones_like(prefix), None, max_new_tokens, think_end)
        return answers
    return _answer_batch(model, tokenizer, sequences, cuts, exit_ids, attention_mask, past_key_values, max_new_tokens,
                         think_end)


def _answer_batch(model, tokenizer, sequences, cuts, exit_ids, attention_mask, past_key_values, max_new_tokens,
                  think_end="</think>"):
    device = sequences.device
    batch = sequences.shape[0]
    if past_key_values is None:
        cache_len = int(cuts.max())
        past_key_values = DynamicCache(config=model.config)
        model(
            input_ids=sequences[:, :cache_len],
            attention_mask=attention_mask[:, :cache_len],
            position_ids=(attention_mask[:, :cache_len].cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            **cache_kwargs(model, past_key_values),
            **last_logits_only(model),
        )
    else:
        cache_len = past_key_values.get_seq_length()
    mask = attention_mask[:, :cache_len] * (torch.arange(cache_len, device=device) < cuts[:, None])
    next_position = mask.sum(-1)
    step_ids = torch.as_tensor(list(exit_ids), dtype=torch.long, device=device).expand(batch, -1)
    eos = eos_token_ids(model, tokenizer)
    eos_tensor = torch.tensor(eos, dtype=torch.long, device=device)
    delta = brace_delta(tokenizer, vocab_size(model)).to(device)
    # Rows leave the batch (and the cache) as soon as their answer is complete, so one long answer does not make
    # every other row decode to max_new_tokens.
    active = torch.arange(batch, device=device)
    forward_options = {**cache_kwargs(model, past_key_values), **last_logits_only(model)}
    depth = torch.zeros(batch, dtype=torch.long, device=device)
    generated = torch.full((batch, max_new_tokens), eos[0] if eos else 0, dtype=torch.long, device=device)
    log_probs = torch.zeros((batch, max_new_tokens), device=device)
    for step in range(max_new_tokens):
        width = step_ids.shape[1]
        mask = torch.cat([mask, torch.ones(len(active), width, dtype=mask.dtype, device=device)], dim=-1)
        positions = next_position[:, None] + torch.arange(width, device=device)
        logits = model(
            input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True, **forward_options,
        ).logits[:, -1]
        next_position = next_position + width
        token = logits.argmax(-1)
        generated[active, step] = token
        log_probs[active, step] = torch.log_softmax(logits.float(), -1).gather(1, token[:, None])[:, 0]
        depth = depth + delta[token]
        finished = (depth < 0) | torch.isin(token, eos_tensor)
        if bool(finished.all()):
            break
        if bool(finished.any()):
            going = (~finished).nonzero()[:, 0]
            past_key_values.batch_select_indices(going)
            active, mask, next_position, depth, token = (t[going] for t in (active, mask, next_position, depth, token))
        step_ids = token[:, None]
    return answers_from_tokens(tokenizer, generated, log_probs, delta, eos, exit_ids, think_end)


def answers_from_tokens(tokenizer, generated: torch.Tensor, log_probs: torch.Tensor, delta: torch.Tensor,
                        eos: Sequence[int], exit_ids: Sequence[int] = (),
                        think_end: str | None = "</think>") -> list[LynxAnswer]:
    """Each row's greedy answer tokens `[B, N]` (with their log-probabilities) as an `LynxAnswer`, cut after the
    box's closing brace or before EOS; confidence is the geometric mean of the kept tokens' probabilities."""
    answers = []
    for row, lp in zip(generated.tolist(), log_probs.tolist()):
        ids = _truncate_at_close(row, delta, eos)
        confidence = math.exp(sum(lp[: len(ids)]) / len(ids)) if ids else float("nan")
        answer = close_box(tokenizer.decode(ids, skip_special_tokens=True))
        answers.append(finished_answer(tokenizer, list(exit_ids) + ids, think_end, token_ids=ids, answer=answer,
                                       confidence=confidence))
    return answers


def vocab_size(model) -> int:
    """Rows of the model's output layer, which can exceed `len(tokenizer)` (R1-Distill-Qwen: 151,936 vs 151,665)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.vocab_size)


def reusable_cache(model, cache, batch: int, needed: int) -> bool:
    """Whether `cache` (e.g. the one `generate` returned) can serve the masked answer pass exactly: a
    `DynamicCache` of plain full-attention layers, for `batch` rows, holding at least `needed` positions, in the
    model's current dtype (not one written before `model.to(torch.bfloat16)`)."""
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return False
    keys = getattr(layers[0], "keys", None)
    if keys is None or keys.dim() != 4 or keys.shape[0] != batch:
        return False
    if keys.dtype != getattr(model, "dtype", keys.dtype):
        return False
    return cache.get_seq_length() >= needed


def _rows_answered_alone(model, longest: int) -> bool:
    """Whether masking cached positions would change the function for this model: linear-attention layers (their
    state cannot be masked) or sliding windows shorter than the longest answer context."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    layers = DynamicCache(config=model.config).layers
    if any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in layers):
        return True
    if any(getattr(layer, "is_sliding", False) for layer in layers):
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        window = getattr(config, "sliding_window", None)
        return window is None or longest > int(window)
    return False


def cache_kwargs(model, cache) -> dict:
    """`{"cache": cache}` for models whose forward takes `cache` (transformers >= 5.2x), else `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def last_logits_only(model) -> dict:
    """`{"logits_to_keep": 1}` where the model's forward supports it: skips the LM head on every position but the
    last (a fifth of a forward for a 135M model with a 49k vocabulary)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def eos_token_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids: the model's generation config's, else the tokenizer's (always a list)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def pad_token_id(model, tokenizer) -> int:
    """The tokenizer's pad id, else the first end-of-sequence id (what `generate` falls back to), else 0."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    eos = eos_token_ids(model, tokenizer)
    return eos[0] if eos else 0


def _truncate_at_close(row: list[int], delta: torch.Tensor, eos: list[int]) -> list[int]:
    depth = 0
    for i, token in enumerate(row):
        if token in eos:
            return row[:i]
        depth += int(delta[token])
        if depth < 0:
            return row[: i + 1]
    return row


_BRACE_DELTA_CACHE: "weakref.WeakKeyDictionary[object, torch.Tensor]" = weakref.WeakKeyDictionary()


def brace_delta(tokenizer, size: int | None = None) -> torch.Tensor:
    """Per token id, the number of `{` minus `}` in its text (computed once per tokenizer), zero-padded to `size`
    entries for models whose output layer is larger than the tokenizer.

    Example:
        >>> from lynx_hf import organism
        >>> _, tok = organism.load()
        >>> delta = brace_delta(tok, size=len(tok) + 5)
        >>> int(delta[tok.convert_tokens_to_ids("{")]), int(delta[-1]), delta.shape[0] == len(tok) + 5
        (1, 0, True)
    """
    if tokenizer not in _BRACE_DELTA_CACHE:
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        _BRACE_DELTA_CACHE[tokenizer] = torch.tensor(
            [(p or "").count("{") - (p or "").count("}") for p in pieces], dtype=torch.long
        )
    delta = _BRACE_DELTA_CACHE[tokenizer]
    if size is not None and size > delta.shape[0]:
        delta = torch.nn.functional.pad(delta, (0, size - delta.shape[0]))
    return delta

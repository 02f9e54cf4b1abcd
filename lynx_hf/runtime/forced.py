"""Forced exits at every cue of one finished trace, the labels' construction: one forward up to the last cue (the
cues' features and a KV cache), then every cue's forced answer from that cache in one batch, packed after the shared
cache where the model's attention allows it. `collect` labels its traces with it and the live audit re-checks
audited traces with it, so both read the same answers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from .capture import HiddenStateCapture
from .cues import CueEvent
from .exit import (
    LynxAnswer, answer_after_exit, answers_from_tokens, brace_delta, cache_kwargs, eos_token_ids, exit_cut,
    last_logits_only, vocab_size,
)


@torch.no_grad()
def force_exits(model, tokenizer, layers: Sequence[int], token_ids: Sequence[int], events: Sequence[CueEvent],
                exit_ids: Sequence[int], *, exit_construction: str = "drop_cue",
                answer_max_new_tokens: int = 16) -> tuple[torch.Tensor, list[LynxAnswer]]:
    """The features (`[events, layers x hidden]`, float32 on the CPU) and forced-exit answers at every cue event of
    one finished trace: one forward up to the last cue, whose KV cache answers every event in one batch (packed
    into one sequence by `answer_from_shared_prefix` where `supports_packed_answers`, else copied once per event
    for `answer_after_exit`). What `Collector.label_trace` labels and what `Lynx.audit` re-checks live traces with.

    Example:
        >>> from lynx_hf import organism
        >>> from lynx_hf.runtime.cues import CueEvent
        >>> from lynx_hf.runtime.exit import exit_token_ids
        >>> model, tok = organism.load()
        >>> ids = tok(organism.prompt(tok, "Ann has 5 pens and gives away 2. How many are left?")).input_ids
        >>> features, answers = force_exits(model, tok, (2, 4), ids, [CueEvent(len(ids) - 1, len(ids) - 1, "wait")],
        ...                                 exit_token_ids(tok))
        >>> features.shape[0], len(answers)
        (1, 1)
    """
    hidden_size = int(model.config.get_text_config().hidden_size)
    if not events:
        return torch.zeros(0, len(layers) * hidden_size), []
    device = next(model.parameters()).device
    # Nothing after the last cue is read: its features and every cut lie before it.
    ids = torch.tensor([list(token_ids[: max(e.position for e in events) + 1])], device=device)
    cache = DynamicCache(config=model.config)
    with HiddenStateCapture(model, layers, last_only=False) as capture:
        model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache), **last_logits_only(model))
        hidden = capture.features()[0]
    features = hidden[[e.position for e in events]].float().cpu()
    cuts = [exit_cut(e.position, e.start, exit_construction) for e in events]
    if supports_packed_answers(model):
        answers = answer_from_shared_prefix(model, tokenizer, cache, cuts, exit_ids,
                                            max_new_tokens=answer_max_new_tokens)
    else:
        cache.batch_repeat_interleave(len(events))
        answers = answer_after_exit(model, tokenizer, ids.expand(len(events), -1), cuts, exit_ids,
                                    past_key_values=cache, max_new_tokens=answer_max_new_tokens)
    return features, answers


def supports_packed_answers(model) -> bool:
    """Whether `answer_from_shared_prefix` is exact for `model`: full attention in every layer (no sliding window,
    which a custom mask would override) through an attention kernel that takes a 4D mask (sdpa or eager)."""
    config = model.config.get_text_config()
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    return all(t == "full_attention" for t in (getattr(config, "layer_types", None) or ["full_attention"]))


@torch.no_grad()
def answer_from_shared_prefix(model, tokenizer, cache: DynamicCache, cuts: Sequence[int], exit_ids: Sequence[int],
                              *, max_new_tokens: int = 16) -> list[LynxAnswer]:
    """Forced-exit answers for many cuts of one trace from its batch-1 KV cache, without copying the cache per row.

    Every row's tokens (first its exit tokens, then one answer token per step) are packed into one batch-1 sequence
    appended to the cache; a 4D mask lets each token see the trace before its row's cut and its own row's earlier
    tokens only, and positions continue from the cut. Each row therefore computes the same function as greedy
    decoding from `trace[:cut] + exit_ids` (`answer_after_exit` on that prefix; equal answers are tested, floating
    point aside), while the trace's keys and values are stored once instead of once per row, and each step appends
    one token per unfinished row instead of re-concatenating a `[rows, trace]` cache. The cache is consumed. Only
    for models where `supports_packed_answers` holds.

    Example:
        >>> from lynx_hf import organism
        >>> from lynx_hf.runtime.exit import cache_kwargs, exit_token_ids
        >>> model, tok = organism.load()
        >>> question = organism.problems("arithmetic", "test", n=1)[0]["question"]
        >>> ids = tok(organism.prompt(tok, question), return_tensors="pt").input_ids
        >>> cache = DynamicCache(config=model.config)
        >>> _ = model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
        >>> n = ids.shape[1]
        >>> [a.answer is not None for a in answer_from_shared_prefix(model, tok, cache, [n - 1, n], exit_token_ids(tok))]
        [True, True]
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    rows, width = len(cuts), len(exit_ids)
    prefix_len = cache.get_seq_length()
    cuts_t = torch.as_tensor(list(cuts), dtype=torch.long, device=device)
    if rows and int(cuts_t.max()) > prefix_len:
        raise ValueError(f"The KV cache holds {prefix_len} positions but a cut is at {int(cuts_t.max())}.")
    eos = eos_token_ids(model, tokenizer)
    eos_tensor = torch.tensor(eos, dtype=torch.long, device=device)
    delta = brace_delta(tokenizer, vocab_size(model)).to(device)
    forward_options = cache_kwargs(model, cache)
    keep_option = "logits_to_keep" in last_logits_only(model)
    # owner[k]: the row a packed slot belongs to (-1 for the trace), so that a row sees its own tokens only
    owner = torch.full((prefix_len,), -1, dtype=torch.long, device=device)
    active = torch.arange(rows, device=device)
    step_ids = torch.as_tensor(list(exit_ids), dtype=torch.long, device=device).repeat(rows)
    step_rows = active.repeat_interleave(width)
    positions = (cuts_t[:, None] + torch.arange(width, device=device)).reshape(-1)
    last = torch.arange(1, rows + 1, device=device) * width - 1  # each row's last packed token this step
    depth = torch.zeros(rows, dtype=torch.long, device=device)
    generated = torch.full((rows, max_new_tokens), eos[0] if eos else 0, dtype=torch.long, device=device)
    log_probs = torch.zeros((rows, max_new_tokens), device=device)
    blocked = torch.finfo(dtype).min
    for step in range(max_new_tokens if rows else 0):
        start = owner.shape[0]
        owner = torch.cat([owner, step_rows])
        slots = torch.arange(owner.shape[0], device=device)
        query_slots = slots[start:]
        sees_trace = slots[None, :] < cuts_t[step_rows][:, None]
        sees_own = (owner[None, :] == step_rows[:, None]) & (slots[None, :] <= query_slots[:, None])
        mask = torch.zeros(sees_trace.shape, dtype=dtype, device=device).masked_fill_(~(sees_trace | sees_own), blocked)
        keep = {"logits_to_keep": last} if keep_option else {}
        logits = model(input_ids=step_ids[None], attention_mask=mask[None, None], position_ids=positions[None],
                       use_cache=True, **forward_options, **keep).logits[0]
        if not keep_option:
            logits = logits[last]
        token = logits.argmax(-1)
        generated[active, step] = token
        log_probs[active, step] = torch.log_softmax(logits.float(), -1).gather(1, token[:, None])[:, 0]
        depth[active] += delta[token]
        going = ~((depth[active] < 0) | torch.isin(token, eos_tensor))
        if not bool(going.any()):
            break
        positions = positions[last][going] + 1
        active, step_ids = active[going], token[going]
        step_rows = active
        last = torch.arange(len(active), device=device)
    return answers_from_tokens(tokenizer, generated, log_probs, delta, eos, exit_ids)

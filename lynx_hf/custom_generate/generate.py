"""LYNX early exit as a transformers `custom_generate` recipe: the exact exit in one `generate` call.

Every Lynx bundle ships this file as `custom_generate/generate.py` (with `custom_generate/requirements.txt` naming
`lynx-hf`), so a bundle folder or Hub repo is also a generation recipe:

```python
out = model.generate(**inputs, custom_generate="lynx/deepseek-r1-distill-qwen-1.5b", trust_remote_code=True,
                     tokenizer=tokenizer, confidence=0.9, max_new_tokens=2048)
```

transformers (5.x) requires `trust_remote_code=True` for a local folder as well as for a Hub repo, because this file
is executed. The bundle is loaded from the same folder or repo (same `revision=`, `cache_dir=`, `token=`,
`local_files_only=`), or from `lynx=` (a `Lynx`, a folder or a repo id) when given.

Decoding: greedy or sampling (`do_sample`, `temperature`, `top_k`, `top_p`, and your `logits_processor`s) while the
model thinks. At a cue where the probe is confident (decided as in stop mode: the token after the cue confirms that
the cue word ended and the cue's hidden state has been computed), the row's cue word is dropped, its KV cache is cut
back to just before the cue (`DynamicCache.crop` at batch size 1; with several rows the dropped positions are masked
out of that row instead, and the next positions continue right after the cut), the bundle's exit text (e.g.
`</think> Final Answer: \\boxed{`) is appended, and the model answers greedily from its own logits until the box
closes or EOS, at most `answer_max_new_tokens` tokens: the same construction that labelled the calibration data,
so the conformal guarantee applies. Rows without a confident cue decode normally until EOS or `max_new_tokens`.

Returns the sequences (prompt, then per row the kept thinking tokens, exit text and answer, right-padded with the
pad token), or with `return_dict_in_generate=True` a `LynxGenerateOutput` that also holds `exits` (one
`ExitRecord` per row; for an exited row the cue word spanned `start..position` of the trace and was dropped, so the
exit text begins at index `start` of the returned sequence). Your `logits_processor`s and `stopping_criteria` act
on the thinking phase only and see the tokens fed to the model (at batch size > 1 an exited row's dropped cue stays
there, masked). Beam search, assisted decoding and streamers are refused.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.utils import ModelOutput

import lynx_hf
from lynx_hf.runtime.exit import cache_kwargs, exit_cut

_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download")
_CALL_OPTIONS = ("confidence", "guarantee", "shadow", "risk_level", "rule", "max_thinking_tokens")
_UNSUPPORTED = ("assistant_model", "streamer", "prefix_allowed_tokens_fn", "negative_prompt_ids",
                "negative_prompt_attention_mask", "inputs_embeds", "past_key_values", "cache")
_IGNORED = ("synced_gpus", "proxies", "trust_remote_code", "custom_generate")
# Generation options that transformers' own processor and stopping-criteria builders implement, used here as
# they are in plain `generate` (while the model thinks), or that change nothing in this loop.
_HANDLED = {
    "max_new_tokens", "max_length", "min_length", "min_new_tokens", "max_time", "do_sample", "temperature", "top_k",
    "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
    "no_repeat_ngram_size", "bad_words_ids", "sequence_bias", "suppress_tokens", "begin_suppress_tokens",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "renormalize_logits", "watermarking_config", "stop_strings", "eos_token_id", "pad_token_id", "bos_token_id",
    "decoder_start_token_id", "num_return_sequences", "return_dict_in_generate", "use_cache", "transformers_version",
    "_from_model_config", "disable_compile", "compile_config",
    # beam-search-only settings, inert at num_beams=1 in plain generate too
    "length_penalty", "early_stopping", "diversity_penalty", "num_beam_groups",
}


@dataclass
class LynxGenerateOutput(ModelOutput):
    """`sequences` `[B, T]` as `generate` returns them, and `exits`: per row, where Lynx exited (see `ExitRecord`)."""

    sequences: torch.LongTensor | None = None
    exits: list | None = None


def _given(kwargs: dict, names) -> dict:
    """Pop `names` from `kwargs`; those given a value other than None."""
    popped = {k: kwargs.pop(k) for k in names if k in kwargs}
    return {k: v for k, v in popped.items() if v is not None}


def _bundle_source(explicit) -> str | os.PathLike | None:
    """Where this recipe was loaded from: transformers does not pass `custom_generate` on, so read it from the
    calling `GenerationMixin.generate` frame."""
    if explicit is not None:
        return explicit
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            break
        value = frame.f_locals.get("custom_generate")
        if frame.f_code.co_name == "generate" and isinstance(value, (str, os.PathLike)):
            return value
        frame = frame.f_back
    return None


def _load_lynx(model, source, tokenizer, hub_kwargs: dict, options: dict):
    """(attached Lynx, whether this call attached it)."""
    if isinstance(source, lynx_hf.Lynx):
        if source.model is None:
            source.attach(model, tokenizer)
            return source, True
        if source.model is not model and not lynx_hf.runtime.bundle._wraps(source.model, model):
            raise ValueError("lynx= is attached to another model: attach it to this one or pass its folder/repo id.")
        return source, False
    if source is None:
        raise ValueError(
            "Could not tell which Lynx bundle to use: call model.generate(..., custom_generate=<bundle folder or "
            "repo id>, trust_remote_code=True) or pass lynx=<Lynx, folder or repo id>."
        )
    lynx = lynx_hf.Lynx.from_pretrained(source, model=model, tokenizer=tokenizer, **options, **hub_kwargs)
    return lynx, True


def _generation_config(model, generation_config, kwargs: dict) -> GenerationConfig:
    """The call's generation config as plain `generate` builds it, refusing by name what this recipe cannot do."""
    config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    unexpected = sorted(k for k in model_kwargs if k not in ("output_attentions", "output_hidden_states"))
    if unexpected:
        raise TypeError(f"Lynx custom_generate got unexpected arguments {unexpected}.")
    if (config.num_beams or 1) > 1:
        raise lynx_hf.UnsupportedGenerationError("Lynx custom_generate supports greedy and sampling only (num_beams=1).")
    baseline = GenerationConfig()
    baseline.update(**model.generation_config._get_default_generation_params(), defaults_only=True)
    defaults = baseline.to_dict()
    refused = sorted(
        key for key, value in config.to_dict().items()
        if key not in _HANDLED and key != "num_beams" and value != defaults.get(key)
        and (value or defaults.get(key))  # False, 0 and None all mean "off"
    )
    if refused:
        raise lynx_hf.UnsupportedGenerationError(
            f"Lynx custom_generate does not support {', '.join(f'{k}={config.to_dict()[k]!r}' for k in refused)}: "
            "drop these options, or use stop mode (stopping_criteria=[lynx.stopper()], then lynx.answer(out)) with "
            "plain generate."
        )
    return config


@torch.no_grad()
def generate(model, *args, **kwargs) -> torch.LongTensor | LynxGenerateOutput:
    """Decode with LYNX's exact exit (cue dropped, cache cut, exit text, greedy answer) in one call.

    Takes the arguments of `model.generate` (`input_ids`/`inputs`, `attention_mask`, `generation_config`,
    `logits_processor`, `stopping_criteria` and the generation options that shape sampling or stopping, built by
    transformers' own helpers so they act as in plain `generate`: `do_sample`, `temperature`, `top_k`, `top_p`,
    `min_p`, `repetition_penalty`, `no_repeat_ngram_size`, `bad_words_ids`, `stop_strings` (with `tokenizer=`),
    `num_return_sequences`, `max_new_tokens`, ...) plus `tokenizer=` (default: loaded from `model.name_or_path`),
    `lynx=` (a `Lynx`, folder or repo id; default: where this recipe was loaded from), the per-call settings
    `confidence=`, `guarantee=`, `shadow=`, `risk_level=`, `rule=`, `max_thinking_tokens=` (also applied to a given
    `Lynx`, for this call only),
    `allow_base_model_mismatch=` and the Hub options `revision=`, `cache_dir=`, `token=`, `local_files_only=`.
    Options it cannot honour are refused by name.
    """
    input_ids = kwargs.pop("input_ids", None)
    inputs = kwargs.pop("inputs", None)
    if args:
        inputs = args[0]
    if input_ids is None:
        input_ids = inputs
    if input_ids is None:
        raise ValueError("Lynx custom_generate needs input_ids (a decoder-only prompt).")
    attention_mask = kwargs.pop("attention_mask", None)
    tokenizer = kwargs.pop("tokenizer", None)
    source = _bundle_source(kwargs.pop("lynx", None))
    # An explicit None (what a wrapper forwarding its own defaults passes) means "the bundle's setting".
    hub_kwargs = _given(kwargs, _HUB_KWARGS)
    call_options = _given(kwargs, _CALL_OPTIONS)
    attach_options = {k: kwargs.pop(k) for k in ("allow_base_model_mismatch",) if k in kwargs}
    for key in _UNSUPPORTED:
        if kwargs.pop(key, None) is not None:
            raise lynx_hf.UnsupportedGenerationError(f"Lynx custom_generate does not support {key}=.")
    for key in _IGNORED:
        kwargs.pop(key, None)
    user_processors = kwargs.pop("logits_processor", None)
    user_criteria = kwargs.pop("stopping_criteria", None)
    config = _generation_config(model, kwargs.pop("generation_config", None), kwargs)

    lynx, attached_here = _load_lynx(model, source, tokenizer, hub_kwargs, attach_options)
    tokenizer = tokenizer or lynx.tokenizer
    model._prepare_special_tokens(config, kwargs_has_attention_mask=attention_mask is not None, device=input_ids.device)
    if attention_mask is None:  # inferred from the pad token where possible, as plain generate does
        attention_mask = model._prepare_attention_mask_for_generation(input_ids, config, {})
    n = config.num_return_sequences or 1
    input_ids, attention_mask = input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0)
    if config.max_new_tokens is not None:
        config.max_length = config.max_new_tokens + input_ids.shape[1]
    processors = model._get_logits_processor(
        generation_config=config, input_ids_seq_length=input_ids.shape[1], encoder_input_ids=input_ids,
        logits_processor=LogitsProcessorList(user_processors or []), device=input_ids.device,
        model_kwargs={"attention_mask": attention_mask},
    )
    criteria = model._get_stopping_criteria(config, StoppingCriteriaList(user_criteria or []), tokenizer=tokenizer)
    try:
        sequences, exits = _decode(model, lynx, input_ids, attention_mask, config, processors, criteria, call_options)
    finally:
        if attached_here:
            lynx.detach()
    return LynxGenerateOutput(sequences=sequences, exits=exits) if config.return_dict_in_generate else sequences


def _decode(model, lynx, input_ids, attention_mask, config, processors, criteria, call_options):
    """Think with `processors` and `criteria` (as plain generate), exit where Lynx decides, answer greedily."""
    device = input_ids.device
    batch, prompt_length = input_ids.shape
    mask = attention_mask.to(device=device, dtype=torch.long)
    eos = config._eos_token_tensor if config._eos_token_tensor is not None else torch.tensor([], device=device)
    eos = eos.reshape(-1).to(device)
    pad = int(config._pad_token_tensor) if config._pad_token_tensor is not None else (int(eos[0]) if eos.numel() else 0)
    answer_budget = lynx.config.answer_max_new_tokens
    exit_ids = torch.tensor(lynx.exit_ids, dtype=torch.long, device=device)
    ckw = lambda cache: cache_kwargs(model, cache)  # noqa: E731

    cache = DynamicCache(config=model.config)
    ids = input_ids  # cache-aligned: every token fed to (or about to be fed to) the model
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                   use_cache=True, **ckw(cache)).logits[:, -1]
    # Per row: the kept output tokens after the prompt, and its phase: 0 thinking, 1 forcing the exit text,
    # 2 answering (greedy), 3 done.
    kept: list[list[int]] = [[] for _ in range(batch)]
    phase = torch.zeros(batch, dtype=torch.long, device=device)
    forced = torch.zeros(batch, dtype=torch.long, device=device)  # next exit-text index for forcing rows
    depth = torch.zeros(batch, dtype=torch.long, device=device)
    answered = torch.zeros(batch, dtype=torch.long, device=device)
    exit_rows: dict[int, tuple[int, int]] = {}  # row -> (cut in kept coordinates, position of the cue's last token)
    delta = lynx.brace_delta.to(device)
    call = None
    try:
        while True:
            thinking = phase == 0
            if thinking.any():
                scores = processors(ids, logits.float())
                if config.do_sample:
                    token = torch.multinomial(torch.softmax(scores, -1), 1)[:, 0]
                else:
                    token = scores.argmax(-1)
            else:
                token = logits.argmax(-1)
            greedy = logits.argmax(-1)
            exit_token = exit_ids[forced.clamp(max=exit_ids.numel() - 1)]
            token = torch.where(phase == 2, greedy, torch.where(phase == 1, exit_token, token))
            token = torch.where(phase == 3, torch.full_like(token, pad), token)
            ids = torch.cat([ids, token[:, None]], dim=-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            for row in torch.nonzero(phase != 3)[:, 0].tolist():
                kept[row].append(int(token[row]))

            # Answering rows: stop at the box's closing brace or EOS (counted from the token after the exit text).
            is_eos = torch.isin(token, eos)
            answering = phase == 2
            depth = torch.where(answering, depth + delta[token], depth)
            answered = answered + answering.long()
            finish_answer = answering & ((depth < 0) | is_eos | (answered >= answer_budget))
            # Forcing rows move on through the exit text; after its last token they answer.
            forcing = phase == 1
            forced = torch.where(forcing, forced + 1, forced)
            start_answer = forcing & (forced >= exit_ids.numel())

            # Thinking rows: Lynx's stop-mode decision, then EOS and the stopping criteria (token budget, stop strings,
            # yours), as plain generate applies them.
            decide = torch.zeros(batch, dtype=torch.bool, device=device)
            user_stop = torch.zeros_like(decide)
            if thinking.any():
                if call is None:
                    call = lynx._start_call("stop", model, ids, mask, **call_options)
                    call.end_ids = eos.long()  # a row's EOS is no thinking token (a cue it confirms is an event)
                # Rows that ended (EOS, a stop string, a criterion of yours) or exited are over: what this loop
                # writes after their end (padding) neither thinks nor counts cues, whatever their neighbours do.
                # Shadow and audited rows never exit.
                decide = call.acting(call.observe(ids, running=thinking)) & thinking
                user_stop = criteria(ids, scores)
            finish_thinking = thinking & ~decide & (is_eos | user_stop)

            phase = torch.where(finish_answer | finish_thinking, torch.full_like(phase, 3), phase)
            phase = torch.where(start_answer, torch.full_like(phase, 2), phase)
            depth = torch.where(start_answer, torch.zeros_like(depth), depth)
            if decide.any():
                records = call.records()
                rows = torch.nonzero(decide)[:, 0].tolist()
                for row in rows:
                    record = records[row]
                    cut = exit_cut(record.position, record.start, lynx.config.exit_construction)
                    # dropped positions, counting the token just appended (none for a budget exit, which keeps it)
                    drop = ids.shape[1] - cut
                    exit_rows[row] = (cut - prompt_length, record.position)
                    del kept[row][len(kept[row]) - drop:]
                    if batch == 1 or drop > 0:  # fed now: the whole exit text (one row) or its first token
                        kept[row].extend(lynx.exit_ids if batch == 1 else lynx.exit_ids[:1])
                if batch == 1:
                    # One row: cut the cache back to the prefix and feed the whole exit text in one forward (after
                    # the token just appended, where a budget exit keeps it: the cache does not hold it yet).
                    cut = ids.shape[1] - drop
                    surplus = cache.get_seq_length() - cut
                    if surplus > 0:
                        cache.crop(-surplus)  # transformers >= 5.2x: a negative count removes that many positions
                    fed = cache.get_seq_length()
                    ids = torch.cat([ids[:, :cut], exit_ids[None]], dim=-1)
                    mask = torch.cat([mask[:, :cut], torch.ones_like(exit_ids)[None]], dim=-1)
                    logits = model(input_ids=ids[:, fed:], attention_mask=mask,
                                   position_ids=(mask.cumsum(-1) - 1)[:, fed:], use_cache=True, **ckw(cache)).logits[:, -1]
                    phase[:] = 2
                    depth[:] = 0
                    continue
                # Several rows: mask the dropped positions of exiting rows (the cache keeps them, unattended) and force
                # the exit text one token per step from the next step on.
                kept_last = torch.zeros_like(decide)  # budget exits: the token just appended stays and is fed now
                for row in rows:
                    cut = exit_rows[row][0] + prompt_length
                    if cut == ids.shape[1]:
                        kept_last[row] = True
                        continue
                    mask[row, cut:] = 0
                    # The token just appended is replaced by the first exit token, fed now.
                    ids[row, -1] = exit_ids[0]
                    mask[row, -1] = 1
                forced = torch.where(decide, torch.where(kept_last, 0, 1), forced)
                phase = torch.where(decide, torch.where(forced >= exit_ids.numel(), 2, 1), phase)
                depth = torch.where(decide, torch.zeros_like(depth), depth)
            if bool((phase == 3).all()):
                break
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, -1:]
            logits = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=position_ids, use_cache=True,
                           **ckw(cache)).logits[:, -1]

        records = call.records()
        width = max(len(k) for k in kept)
        out = torch.full((batch, prompt_length + width), pad, dtype=torch.long, device=device)
        out[:, :prompt_length] = input_ids
        for row, tokens in enumerate(kept):
            out[row, prompt_length:prompt_length + len(tokens)] = torch.tensor(tokens, dtype=torch.long, device=device)
        return out, records
    finally:
        if call is not None:
            call.release()


"""The forced exit: one construction, and a cached batched answer pass equal to re-prefilling every prefix."""

import pytest
import torch

from conftest import tiny_llama
from lynx_hf.runtime.exit import answer_after_exit, exit_cut, exit_prefix, exit_token_ids, DEFAULT_EXIT_TEXT
from lynx_hf.errors import LynxConfigError


def test_drop_cue_cuts_before_the_cue_word_and_keep_cue_after_it():
    assert exit_cut(position=7, start=5, construction="drop_cue") == 5
    assert exit_cut(position=7, start=5, construction="keep_cue") == 8
    assert exit_prefix([1, 2, 3, 4], 2, [9, 9]) == [1, 2, 9, 9]
    with pytest.raises(LynxConfigError, match="drop_cue"):
        exit_cut(1, 1, "drop_everything")


def test_exit_text_round_trips_in_a_real_bpe(smollm2_tokenizer):
    ids = exit_token_ids(smollm2_tokenizer)
    assert smollm2_tokenizer.decode(ids) == DEFAULT_EXIT_TEXT


def _naive_greedy(model, prefix, steps):
    ids = torch.tensor([prefix])
    out = []
    for _ in range(steps):
        nxt = int(model(input_ids=ids).logits[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_cached_answer_pass_equals_reprefilling_each_prefix(smollm2_tokenizer):
    tok = smollm2_tokenizer
    model = tiny_llama(vocab_size=len(tok), seed=3)
    model.generation_config.eos_token_id = None
    torch.manual_seed(0)
    trace = torch.randint(100, 2000, (1, 40))
    cuts = [5, 17, 33, 40]
    exit_ids = exit_token_ids(tok)
    sequences = trace.expand(len(cuts), -1)
    answers = answer_after_exit(model, tok, sequences, cuts, exit_ids, max_new_tokens=6)
    for cut, answer in zip(cuts, answers):
        expected = _naive_greedy(model, exit_prefix(trace[0].tolist(), cut, exit_ids), 6)
        assert answer.token_ids == expected[: len(answer.token_ids)]
        assert len(answer.token_ids) > 0


def test_cached_answer_pass_handles_left_padding(smollm2_tokenizer):
    tok = smollm2_tokenizer
    model = tiny_llama(vocab_size=len(tok), seed=4)
    model.generation_config.eos_token_id = None
    torch.manual_seed(1)
    a = torch.randint(100, 2000, (30,))
    b = torch.randint(100, 2000, (22,))
    sequences = torch.stack([a, torch.cat([torch.zeros(8, dtype=torch.long), b])])
    mask = torch.stack([torch.ones(30, dtype=torch.long), torch.cat([torch.zeros(8), torch.ones(22)]).long()])
    exit_ids = exit_token_ids(tok)
    answers = answer_after_exit(model, tok, sequences, [25, 8 + 15], exit_ids, attention_mask=mask, max_new_tokens=5)
    assert answers[0].token_ids == _naive_greedy(model, exit_prefix(a.tolist(), 25, exit_ids), 5)[: len(answers[0].token_ids)]
    assert answers[1].token_ids == _naive_greedy(model, exit_prefix(b.tolist(), 15, exit_ids), 5)[: len(answers[1].token_ids)]

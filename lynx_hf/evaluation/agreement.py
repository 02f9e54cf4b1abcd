"""Live agreement: the real plug-ins inside `model.generate` (stop mode and shadow mode) on the collection's own
batches and seeds, against replay at the same threshold (`live_agreement`), one exit decision at a time
(`compare_exits`, which names the reason of each disagreement).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..runtime.conformal import exits
from ..runtime.exit import eos_token_ids
from .live_rules import regenerate, shard_batches
from .replay import Replay

__all__ = ["compare_exits", "live_agreement"]


def _strip(row: list[int], eos: set[int], pad: int | None) -> list[int]:
    out = []
    for token in row:
        if token in eos:
            break
        out.append(token)
    while pad is not None and out and out[-1] == pad:
        out.pop()
    return out


def _diverged_at(a: list[int], b: list[int]) -> int | None:
    """First index where two token lists differ within their common length (None: one is a prefix of the other)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


def compare_exits(replay: Replay, trace: int, tau: float, live_position: int, live_score: float | None,
                  live_tokens: list[int] | None = None) -> dict:
    """Compare one live exit decision (position in the trace's unpadded tokens, -1 = none) with replay's at `tau`.

    Returns `agree` (same exited? and same position), both positions and scores, and for a disagreement a `reason`:
    the regenerated trace diverged before the exit (sampling numerics), the score sits near the threshold (cached
    vs teacher-forced hidden states), or the live cue is not a replay event (cue detection differs).

    Example:
        >>> compare_exits(replay, 0, 0.5, live_position=-1, live_score=None)["agree"]  # doctest: +SKIP
        True
    """
    table = replay.table
    events = (table.trace == trace).nonzero().flatten()
    fires = exits(replay.scores[events], tau)
    replay_event = int(events[fires][0]) if bool(fires.any()) else -1
    replay_position = int(table.position[replay_event]) if replay_event >= 0 else -1
    row = {
        "id": table.traces[trace]["id"], "tau": tau, "replay_position": replay_position,
        "replay_score": float(replay.scores[replay_event]) if replay_event >= 0 else None,
        "live_position": live_position, "live_score": live_score,
        "agree": replay_position == live_position, "reason": None,
    }
    if row["agree"]:
        return row
    stored = table.traces[trace]["token_ids"]
    prompt = table.traces[trace]["prompt_length"]
    horizon = max(replay_position, live_position) + 1
    if live_tokens is not None:
        k = _diverged_at(live_tokens[:horizon - prompt], stored[prompt:horizon])
        if k is not None:
            row["reason"] = f"regenerated trace diverged at generated token {k}, before the exit"
            return row
    at_live = (table.position[events] == live_position).nonzero().flatten()
    if live_position >= 0 and not at_live.numel():
        row["reason"] = "live exit at a token that is not a replay cue event (cue detection differs)"
        return row
    # the event where the decisions differ: the earlier of the two exits
    first = min(p for p in (replay_position, live_position) if p >= 0)
    e = int(events[(table.position[events] == first).nonzero().flatten()[0]])
    p = float(replay.scores[e])
    row["replay_score_at_disagreement"] = p
    row["margin"] = abs(p - tau)
    scale = f"; live score {live_score:.6f}" if live_score is not None and first == live_position else ""
    row["reason"] = (f"probe score near the threshold: replay p={p:.6f} vs tau={tau:.6f}{scale} (cached vs "
                     "teacher-forced hidden states)" if abs(p - tau) < 1e-3 else
                     f"replay p={p:.6f} vs tau={tau:.6f} is not near the threshold{scale}: unexplained")
    return row


@torch.no_grad()
def live_agreement(lynx, replay: Replay, n: int, *, modes: Sequence[str] = ("stop", "shadow")) -> dict:
    """Run the attached `lynx` live on the first `n` traces' batches and compare with replay at `lynx.threshold`.

    Each batch is regenerated with the collection's prompts, batch composition, seed and sampling settings, so
    tokens match the stored traces up to the exit. Stop mode (`stopping_criteria=[lynx.stopper()]`, answers via
    `lynx.answer`) and shadow mode (never intervenes) are both checked. Returns per mode: `exit_agreement` (same
    exited? and same position), `exited_agreement` (same exited?), `answer_agreement` (stop mode: same final
    answer as replay), `token_agreement` (regenerated tokens equal the stored ones up to the exit, or entirely in
    shadow mode) and `disagreements` (each with a reason).

    Example:
        >>> report = live_agreement(lynx, replay, n=64)  # doctest: +SKIP
        >>> report["stop"]["exit_agreement"]  # doctest: +SKIP
        1.0
    """
    table = replay.table
    tau = lynx.threshold
    model, tokenizer = lynx.model, lynx.tokenizer
    eos = set(eos_token_ids(model, tokenizer))
    pad = tokenizer.pad_token_id
    shadow_before = lynx.shadow
    report = {"threshold": tau, "confidence": lynx.confidence, "guarantee": lynx.guarantee,
              "sampling": "greedy" if float(table.settings.get("temperature", 0.6)) == 0 else "sampled"}
    try:
        for mode in modes:
            lynx.shadow = mode == "shadow"
            rows, started = [], time.perf_counter()
            for indices, seed in shard_batches(table, n):
                out, width = regenerate(model, tokenizer, table, indices, seed, stopping_criteria=[lynx.stopper()])
                records = lynx.last_exits
                answers = lynx.answer(out) if mode == "stop" else None
                for b, t in enumerate(indices):
                    record = records[b]
                    offset = width - table.traces[t]["prompt_length"]
                    live_position = record.position - offset if record.would_exit else -1
                    tokens = _strip(out[b, width:].tolist(), eos, pad if pad not in eos else None)
                    row = compare_exits(replay, t, tau, live_position, record.score, tokens)
                    stored = table.traces[t]["token_ids"][table.traces[t]["prompt_length"]:]
                    if mode == "stop" and record.exited:
                        horizon = live_position + 1 - table.traces[t]["prompt_length"]
                        row["tokens_match"] = tokens[:horizon] == stored[:horizon]
                    else:
                        row["tokens_match"] = tokens == stored
                    if answers is not None:
                        replay_answer = _replay_answer(replay, t, tau)
                        row["live_answer"], row["replay_answer"] = answers[b].answer, replay_answer
                        row["answer_agree"] = answers[b].answer == replay_answer
                    rows.append(row)
            summary = {
                "n": len(rows),
                "exit_agreement": _share(r["agree"] for r in rows),
                "exited_agreement": _share((r["live_position"] >= 0) == (r["replay_position"] >= 0) for r in rows),
                "token_agreement": _share(r["tokens_match"] for r in rows),
                "wall_time_s": time.perf_counter() - started,
                "disagreements": [r for r in rows if not r["agree"] or not r.get("answer_agree", True)],
            }
            if mode == "stop":
                summary["answer_agreement"] = _share(r["answer_agree"] for r in rows)
                summary["exit_rate"] = _share(r["live_position"] >= 0 for r in rows)
            report[mode] = summary
    finally:
        lynx.shadow = shadow_before
    return report


def _replay_answer(replay: Replay, trace: int, tau: float) -> str | None:
    table = replay.table
    events = (table.trace == trace).nonzero().flatten()
    fires = exits(replay.scores[events], tau)
    if bool(fires.any()):
        return table.answers[int(events[fires][0])]
    return table.traces[trace].get("answer")


def _share(values) -> float:
    values = list(values)
    return sum(bool(v) for v in values) / len(values) if values else float("nan")

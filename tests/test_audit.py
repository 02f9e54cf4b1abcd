"""Specification of the live audit (lynx_hf.runtime.audit): an anytime-valid check, without labels, that exits change no
more answers than the guarantee allows; audited rows never intervene; audit_rate=0 costs nothing."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import threading

import numpy as np
import pytest
import torch

from lynx_hf import Lynx, LynxConfigError, organism
from lynx_hf.runtime.answers import answers_match, extract_boxed
from lynx_hf.evaluation.audit_replay import replay_rows
from lynx_hf.runtime.audit import (
    ABOVE, CONSISTENT, TOO_FEW, AuditLog, AuditRow, audit_report, rows_needed,
)
from lynx_hf.cli import main
from lynx_hf.pipeline.collect import Collector
from lynx_hf.runtime.bounds import betting_confidence_sequence, binomial_cdf, ratio_confidence_sequence
from lynx_hf.runtime.exit import answer_after_exit, exit_cut

GREEDY = dict(do_sample=False, max_new_tokens=300)
SETTINGS = dict(guarantee="question", confidence=0.9, risk_level=None, rule="envelope")


# --- the confidence sequence ------------------------------------------------------------------------------------

def test_confidence_sequence_keeps_its_coverage_under_repeated_looks_where_clopper_pearson_does_not():
    rng = np.random.default_rng(0)
    rate, alpha, looks, streams = 0.1, 0.05, 300, 400
    # P(Binomial(n, rate) >= k), to read the two-sided 95% Clopper-Pearson lower bound at every look: it exceeds the
    # true rate exactly when that tail is below alpha / 2.
    tails = {n: 1.0 - np.concatenate([[0.0], binomial_cdf(n, rate)[:-1]]) for n in range(1, looks + 1)}
    sequence_misses = naive_false_alarms = 0
    for _ in range(streams):
        x = rng.uniform(size=looks) < rate
        lower, upper = betting_confidence_sequence(x, alpha, grid=200, include=(rate,))
        sequence_misses += bool((lower > rate).any() or (upper < rate).any())
        k = np.cumsum(x)
        naive_false_alarms += any(tails[n][k[n - 1]] < alpha / 2 for n in range(1, looks + 1))
    tolerance = 3 * math.sqrt(alpha * (1 - alpha) / streams)
    assert sequence_misses / streams <= alpha + tolerance
    assert naive_false_alarms / streams > alpha + tolerance  # the false alarms an anytime-valid sequence avoids


def test_ratio_sequence_covers_the_pooled_rate_of_correlated_cues():
    rng = np.random.default_rng(1)
    rate, alpha, rows, streams, bound = 0.15, 0.05, 200, 200, 5
    misses = 0
    for _ in range(streams):
        n = rng.integers(0, bound + 1, size=rows)
        x = np.where(rng.uniform(size=rows) < rate, n, 0)  # all of a row's unsafe cues exit together, or none
        lower, upper = ratio_confidence_sequence(x, n, alpha, bound=bound, grid=200, include=(rate,))
        misses += bool((lower > rate).any() or (upper < rate).any())
    assert misses / streams <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / streams)


def test_sequence_narrows_as_rows_accumulate_and_refuses_out_of_range_rows():
    x = np.random.default_rng(2).uniform(size=1000) < 0.3
    lower, upper = betting_confidence_sequence(x)
    assert np.all(np.diff(lower) >= 0) and np.all(np.diff(upper) <= 0)
    assert upper[-1] - lower[-1] < 0.15 < upper[49] - lower[49]
    with pytest.raises(ValueError, match="0 <= x <= n <= bound"):
        ratio_confidence_sequence([3], [2], bound=4)


# --- verdicts --------------------------------------------------------------------------------------------------------

def _rows(changed: np.ndarray, confidence: float = 0.9) -> list[AuditRow]:
    settings = {**SETTINGS, "confidence": confidence}
    return [AuditRow(**settings, threshold=0.5, reference="1", would_exit=True, exit_answer="2" if c else "1",
                     changed=bool(c), cues=1, unsafe_cues=int(c), unsafe_exits=int(c)) for c in changed]


def test_verdicts_at_rates_well_below_and_well_above_delta():
    rng = np.random.default_rng(3)
    below = audit_report(_rows(rng.uniform(size=400) < 0.02)).groups[0]
    above = audit_report(_rows(rng.uniform(size=400) < 0.3)).groups[0]
    assert below.verdict == CONSISTENT and below.upper < 0.1
    assert above.verdict == ABOVE and above.lower > 0.1
    few = audit_report(_rows(np.ones(rows_needed(0.1, 0.05) - 1))).groups[0]
    assert few.verdict == TOO_FEW
    assert audit_report(_rows(np.ones(rows_needed(0.1, 0.05)))).groups[0].verdict == ABOVE


def test_rows_without_a_reference_are_counted_apart_never_as_agreement():
    row = AuditRow(**SETTINGS, threshold=0.5, reference=None, would_exit=True, exit_answer="2", changed=False,
                   cues=1, unsafe_cues=0, unsafe_exits=0)
    group = audit_report(_rows(np.zeros(10)) + [row] * 5).groups[0]
    assert (group.rows, group.referenced, group.denominator) == (15, 10, 10)


def test_each_setting_is_audited_against_its_own_delta():
    report = audit_report(_rows(np.zeros(50), 0.9) + _rows(np.zeros(50), 0.95))
    assert [(g.confidence, g.delta, g.rows) for g in report.groups] == [(0.9, 0.1, 50), (0.95, 0.05, 50)]
    assert "c=0.95" in str(report) and report.to_dict()["groups"][1]["delta"] == 0.05



def test_the_verdict_and_sequence_of_one_batch_do_not_depend_on_the_order_of_its_rows():
    # 4 of 20 rows of one call changed their answer: the same rows in any order are the same evidence.
    rows = _rows(np.arange(20) < 4)
    orders = [rows, rows[4:] + rows[:4], rows[::2] + rows[1::2]]
    groups = [audit_report(order).groups[0] for order in orders]
    assert len({(g.lower, g.upper, g.verdict) for g in groups}) == 1
    # Rows of several calls (batches): each call's rows are one unit, read after the call.
    batched = [dataclasses.replace(r, batch=i // 5) for i, r in enumerate(_rows(np.arange(40) % 7 == 0))]
    shuffled = [r for b in range(8) for r in reversed(batched[5 * b: 5 * b + 5])]
    assert (audit_report(batched).groups[0].lower, audit_report(batched).groups[0].upper) == \
        (audit_report(shuffled).groups[0].lower, audit_report(shuffled).groups[0].upper)


def test_batched_sequence_keeps_its_coverage_under_a_look_after_every_batch():
    rng = np.random.default_rng(5)
    rate, alpha, streams = 0.1, 0.05, 300
    misses = 0
    for _ in range(streams):
        sizes = rng.integers(1, 17, size=40)  # calls of 1 to 16 audited rows
        batch = np.repeat(np.arange(len(sizes)), sizes)
        x = (rng.uniform(size=batch.size) < rate).astype(float)
        lower, upper = betting_confidence_sequence(x, alpha, grid=200, include=(rate,), batches=batch)
        assert len(lower) == len(sizes)  # one look per batch
        misses += bool((lower > rate).any() or (upper < rate).any())
    assert misses / streams <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / streams)


def test_a_rate_outside_its_sequence_is_explained_in_the_printout():
    # A first call where every row changed, then calls where none did: the sequence keeps the first call's evidence
    # (it is a running intersection over every look), so the pooled rate can fall below its lower bound.
    early = [dataclasses.replace(r, batch=0) for r in _rows(np.ones(12))]
    late = [dataclasses.replace(r, batch=1 + i // 8) for i, r in enumerate(_rows(np.zeros(160)))]
    group = audit_report(early + late).groups[0]
    assert group.rate < group.lower
    text = str(audit_report(early + late))
    assert "outside" in text and "running intersection" in text
    inside = audit_report(_rows(np.arange(40) % 10 == 0))
    assert "outside" not in str(inside)


# --- live audit on the organism --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def organism_setup():
    model, tok = organism.load()
    questions = [p["question"] for p in organism.problems("arithmetic", "test", n=8)]
    enc = tok([organism.prompt(tok, q) for q in questions], return_tensors="pt", padding=True,
              add_special_tokens=False)
    return model, tok, enc


def _lynx(model, tok, **options) -> Lynx:
    return Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok, confidence=0.9, **options)


def _direct_changed(model, tok, lynx, enc, out, records) -> list[bool | None]:
    """Per row, whether the exit changed its answer, recomputed without the audit: the exact stop-mode exit from
    the row's own output (`answer_after_exit` on its prefix) against the full text's boxed answer."""
    prompt_length = enc.input_ids.shape[1]
    changed = []
    for row, record in enumerate(records):
        reference = extract_boxed(tok.decode(out[row, prompt_length:], skip_special_tokens=True))
        if reference is None:
            changed.append(None)
        elif not record.would_exit:
            changed.append(False)
        else:
            cut = exit_cut(record.position, record.start, lynx.config.exit_construction)
            forced = answer_after_exit(model, tok, out[row:row + 1], [cut], lynx.exit_ids,
                                       attention_mask=torch.cat([enc.attention_mask[row:row + 1],
                                                                 torch.ones_like(out[row:row + 1, prompt_length:])], 1))
            changed.append(not answers_match(forced[0].answer, reference))
    return changed


def test_audited_rows_never_stop_in_stop_mode_and_their_disagreement_equals_a_direct_recomputation(organism_setup):
    model, tok, enc = organism_setup
    shadow = _lynx(model, tok, shadow=True)
    expected = model.generate(**enc, stopping_criteria=[shadow.stopper()], **GREEDY)
    lynx = _lynx(model, tok, audit_rate=1.0)
    out = model.generate(**enc, stopping_criteria=[lynx.stopper()], **GREEDY)
    records = lynx.last_exits
    assert torch.equal(out, expected)  # nothing stopped: the full traces
    assert all(r.audited and not r.exited for r in records)
    assert [(r.would_exit, r.position, r.cues_seen) for r in records] == \
        [(r.would_exit, r.position, r.cues_seen) for r in shadow.last_exits]
    assert sum(r.would_exit for r in records) >= 4
    lynx.answer(out)  # settles this call's audit
    rows = lynx.audit_log.rows
    assert len(rows) == 8 and lynx.audit_log.pending_rows == 0
    direct = _direct_changed(model, tok, lynx, enc, out, records)
    assert [r.changed if r.reference is not None else None for r in rows] == direct
    assert [r.would_exit for r in rows] == [r.would_exit for r in records]
    assert all(r.forwards >= 2 for r in rows if r.cues)  # one prefix forward, then the packed answer steps


def test_only_audited_rows_run_on_and_the_others_exit_as_without_the_audit(organism_setup):
    model, tok, enc = organism_setup
    plain = _lynx(model, tok)
    plain_out = model.generate(**enc, stopping_criteria=[plain.stopper()], **GREEDY)
    lynx = _lynx(model, tok, audit_rate=0.5, audit_seed=3)
    out = model.generate(**enc, stopping_criteria=[lynx.stopper()], **GREEDY)
    records, reference = lynx.last_exits, plain.last_exits
    audited = [r.audited for r in records]
    assert 0 < sum(audited) < 8 and audited == (np.random.default_rng((3, 0)).random(8) < 0.5).tolist()
    for row, (got, want) in enumerate(zip(records, reference)):
        assert got.would_exit == want.would_exit and got.position == want.position
        assert got.exited == (want.exited and not got.audited)
        if want.exited and not got.audited:
            end = want.position + 2
            assert torch.equal(out[row, :end], plain_out[row, :end])
    lynx.answer(out)
    assert len(lynx.audit_log) == sum(audited)


def test_in_stream_audited_rows_are_never_forced_and_audit_like_stop_mode(organism_setup):
    model, tok, enc = organism_setup
    stop = _lynx(model, tok, audit_rate=1.0)
    full = model.generate(**enc, stopping_criteria=[stop.stopper()], **GREEDY)
    stop.answer(full)
    lynx = _lynx(model, tok, audit_rate=1.0)
    out = model.generate(**enc, logits_processor=[lynx.exit_processor()],
                         stopping_criteria=[lynx.answer_stopper()], **GREEDY)
    assert torch.equal(out, full[:, : out.shape[1]]) and out.shape == full.shape  # no exit text forced anywhere
    assert all(r.audited and not r.exited and r.answered is None for r in lynx.last_exits)
    report = lynx.audit()  # in-stream calls are checked lazily, once generate has returned
    assert report.pending_rows == 0
    assert [(r.changed, r.unsafe_cues, r.unsafe_exits, r.reference) for r in lynx.audit_log.rows] == \
        [(r.changed, r.unsafe_cues, r.unsafe_exits, r.reference) for r in stop.audit_log.rows]


def test_audit_rate_zero_is_token_identical_and_audits_nothing(organism_setup):
    model, tok, enc = organism_setup
    outputs = []
    for lynx in (_lynx(model, tok), _lynx(model, tok, audit_rate=0.0, audit_seed=5)):
        torch.manual_seed(0)
        outputs.append(model.generate(**enc, stopping_criteria=[lynx.stopper()], do_sample=True, max_new_tokens=200))
        assert lynx._stop_calls[-1].audited is None and len(lynx.audit_log) == 0
        assert not any(r.audited for r in lynx.last_exits)
    assert torch.equal(*outputs)
    assert lynx.audit().groups == []


def test_audit_draws_are_seeded_and_reset_audit_restarts_them(organism_setup):
    model, tok, enc = organism_setup
    short = dict(do_sample=False, max_new_tokens=40)
    draws = []
    for _ in range(2):
        lynx = _lynx(model, tok, audit_rate=0.5, audit_seed=11)
        model.generate(**enc, stopping_criteria=[lynx.stopper()], **short)
        first = [r.audited for r in lynx.last_exits]
        model.generate(**enc, stopping_criteria=[lynx.stopper()], **short)
        draws.append((first, [r.audited for r in lynx.last_exits]))
        lynx.reset_audit()
        assert len(lynx.audit_log) == 0 and lynx.audit_log.pending_rows == 0
        model.generate(**enc, stopping_criteria=[lynx.stopper()], **short)
        assert [r.audited for r in lynx.last_exits] == first
    assert draws[0] == draws[1] and draws[0][0] != draws[0][1]


def test_threads_sharing_one_lynx_audit_into_one_log(organism_setup):
    # one thread checks its rows in answer(), the other's are checked lazily by audit()
    model, tok, enc = organism_setup
    alone = _lynx(model, tok, audit_rate=1.0)
    alone.answer(model.generate(**enc, stopping_criteria=[alone.stopper()], **GREEDY))
    expected = sorted((r.reference or "", r.changed, r.unsafe_cues) for r in alone.audit_log.rows)
    lynx = _lynx(model, tok, audit_rate=1.0)
    errors = []

    def work(index: int) -> None:
        try:
            out = model.generate(**enc, stopping_criteria=[lynx.stopper()], **GREEDY)
            if index == 0:  # settled while the other thread may still generate on the same model
                lynx.answer(out)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    report = lynx.audit()
    assert report.audited_rows == 16 and report.pending_rows == 0
    got = sorted((r.reference or "", r.changed, r.unsafe_cues) for r in lynx.audit_log.rows)
    assert got == sorted(expected * 2)


def test_audit_log_saves_loads_and_resets(organism_setup, tmp_path):
    model, tok, enc = organism_setup
    lynx = _lynx(model, tok, audit_rate=1.0)
    lynx.answer(model.generate(**enc, stopping_criteria=[lynx.stopper()], **GREEDY))
    before = str(lynx.audit())
    lynx.audit_log.save(tmp_path / "audit.json")
    lynx.reset_audit()
    assert lynx.audit().groups == []
    lynx.audit_log = AuditLog.load(tmp_path / "audit.json")
    assert str(lynx.audit()) == before
    with pytest.raises(TypeError, match="AuditLog.load"):
        lynx.audit_log = []
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="not an audit log"):
        AuditLog.load(tmp_path / "other.json")


def test_audit_settings_are_validated_and_kept_by_copies_and_pickles(organism_setup):
    model, tok, _ = organism_setup
    lynx = _lynx(model, tok, audit_rate=0.25, audit_seed=7)
    for other in (copy.copy(lynx), copy.deepcopy(lynx), pickle.loads(pickle.dumps(lynx))):
        assert (other.audit_rate, other.audit_seed) == (0.25, 7) and other.audit_log is not lynx.audit_log
    for bad in (-0.1, 1.5, True, "0.1"):
        with pytest.raises(LynxConfigError, match="audit_rate"):
            lynx.audit_rate = bad
    with pytest.raises(LynxConfigError, match="audit_seed"):
        lynx.audit_seed = 1.5


def organism_eos(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


# --- replay: the same audit on a collected table ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def greedy_table(organism_setup, tmp_path_factory):
    model, tok, _ = organism_setup
    lynx = _lynx(model, tok)
    c = lynx.config
    collector = Collector(model, tok, layers=c.layers, cues=c.cues, think_start=c.think_start, think_end=c.think_end,
                          exit_text=c.exit_text, max_new_tokens=300, temperature=0.0, prompt_fn=organism.prompt)
    folder = tmp_path_factory.mktemp("events")
    return collector.collect(organism.problems("arithmetic", "test", n=8), folder, batch_size=8, progress=False), folder


def test_live_audit_agrees_with_the_replay_on_the_same_traces(organism_setup, greedy_table):
    model, tok, _ = organism_setup
    table, _ = greedy_table
    lynx = _lynx(model, tok, audit_rate=1.0, guarantee="question")
    for trace in table.traces:  # one row per call, so no padding: exactly the collected traces
        ids = torch.tensor([trace["token_ids"][: trace["prompt_length"]]])
        out = model.generate(input_ids=ids, stopping_criteria=[lynx.stopper()], **GREEDY)
        generated = out[0].tolist()
        while generated[-1] in organism_eos(model):  # the rollout keeps no EOS
            generated.pop()
        assert generated == trace["token_ids"]
        lynx.answer(out)
    scores = lynx.probe.predict_proba(table.features).float()
    replayed = replay_rows(table, scores, lynx.threshold, dict(SETTINGS, confidence=lynx.confidence))
    live = lynx.audit_log.rows
    keys = ("reference", "would_exit", "exit_answer", "changed", "cues", "unsafe_cues", "unsafe_exits")
    assert [[getattr(r, k) for k in keys] for r in live] == [[getattr(r, k) for k in keys] for r in replayed]
    assert audit_report(live).groups[0].rate == audit_report(replayed).groups[0].rate


def test_cli_audit_prints_a_report_at_every_step_and_the_gold_rate(greedy_table, capsys):
    _, folder = greedy_table
    assert main(["audit", "--events", str(folder), "--step", "3", "--guarantee", "event"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("after ") == 2 and "after 3 rows" in printed and "after 6 rows" in printed
    assert "all 8 rows" in printed and "gold-labelled premature rate" in printed and "event" in printed
    assert main(["audit", "--events", str(folder), "--step", "0"]) == 2


def test_answers_are_compared_in_worker_threads_too():
    # the audit compares answers wherever answer()/audit() run, e.g. a server's worker thread
    results = []
    worker = threading.Thread(target=lambda: results.append((answers_match("\\frac{1}{2}", "0.5"),
                                                            answers_match("3", "4"))))
    worker.start()
    worker.join()
    assert results == [(True, False)]

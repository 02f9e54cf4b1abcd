"""Recalibration from the live audit: `Lynx.recalibrate`, `lynx-hf recalibrate`, and the audited rows they read."""

import json
import math
import warnings

import pytest
import torch

from lynx_hf import AuditLog, AuditRow, Lynx, organism
from lynx_hf.cli import main as cli
from lynx_hf.errors import LynxConfigError, TooFewAuditedRowsError
from lynx_hf.runtime.audit import observe_row, probe_digest, recalibrate_rows
from lynx_hf.runtime.conformal import Calibration, LynxCalibrationWarning

SETTINGS = dict(guarantee="question", confidence=0.9, risk_level=None, rule="envelope")


def synthetic_rows(n, seed=0, probe=None, cue_free_every=0):
    """Audited rows whose cues' agreement follows their score (a probe that means something)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        k = 0 if cue_free_every and i % cue_free_every == 0 else int(torch.randint(1, 6, (1,), generator=g))
        scores = torch.rand(k, generator=g)
        agree = torch.rand(k, generator=g) < scores
        answers = ["4" if a else "3" for a in agree.tolist()]
        rows.append(observe_row(SETTINGS, 0.9, "4", answers, scores, -1, prompt=f"p{i}", probe=probe))
    return rows


@pytest.fixture(scope="module")
def lynx():
    return Lynx.from_pretrained(organism.BUNDLE_DIR)


def test_audited_rows_keep_cue_scores_and_agreement_labels():
    row = observe_row(SETTINGS, 0.5, "4", ["3", "4", "4.0"], torch.tensor([0.2, 0.7, 0.9]), 1, prompt="p", probe="q")
    assert row.scores == pytest.approx((0.2, 0.7, 0.9))
    assert row.agrees == (False, True, True)  # "4.0" matches "4" as answers_match reads it
    no_reference = observe_row(SETTINGS, 0.5, None, ["3"], torch.tensor([0.2]), -1)
    assert no_reference.agrees is None and no_reference.scores == pytest.approx((0.2,))


def test_audit_log_round_trips_the_rows_recalibration_needs(tmp_path):
    rows = synthetic_rows(12, probe="abc")
    path = tmp_path / "audit.json"
    AuditLog(rows).save(path)
    again = AuditLog.load(path).rows
    assert again == rows
    assert all(isinstance(r.scores, tuple) for r in again)


def test_old_audit_logs_still_audit_but_cannot_recalibrate(tmp_path):
    old = {k: v for k, v in synthetic_rows(1)[0].to_dict().items()
           if k not in ("scores", "agrees", "prompt", "probe")}
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"format": "lynx-hf/audit-log", "version": 1, "rows": [old] * 30}))
    log = AuditLog.load(path)
    assert log.report().groups[0].rows == 30
    with pytest.raises(LynxConfigError, match="older lynx-hf"):
        recalibrate_rows(log.rows, confidence=0.9, guarantee="question")


def test_future_audit_log_versions_are_refused(tmp_path):
    path = tmp_path / "new.json"
    path.write_text(json.dumps({"format": "lynx-hf/audit-log", "version": 99, "rows": []}))
    with pytest.raises(ValueError, match="upgrade lynx-hf"):
        AuditLog.load(path)


def test_recalibration_is_the_calibration_of_the_agreement_labels():
    rows = synthetic_rows(60, cue_free_every=7)
    result = recalibrate_rows(rows, confidence=0.9, guarantee="question")
    with_cues = [r for r in rows if r.scores]
    expected = Calibration(scores=[s for r in with_cues for s in r.scores],
                           safe=[a for r in with_cues for a in r.agrees],
                           question=[i for i, r in enumerate(with_cues) for _ in r.scores])
    assert result.used == 60 and result.calibration.n_questions == len(with_cues)
    for c in (0.8, 0.9):
        for guarantee in ("question", "event"):
            assert result.calibration.threshold(c, guarantee) == expected.threshold(c, guarantee)


def test_rows_without_a_full_answer_give_no_labels():
    rows = synthetic_rows(20)
    blind = [observe_row(SETTINGS, 0.9, None, ["3", "4"], torch.tensor([0.9, 0.95]), -1) for _ in range(5)]
    result = recalibrate_rows(rows + blind, confidence=0.8, guarantee="question")
    assert result.used == 20 and result.without_reference == 5 and result.rows == 25


@pytest.mark.parametrize("guarantee,risk_level", [("question", None), ("question", 0.1), ("event", None),
                                                  ("event", 0.1)])
def test_too_few_rows_are_refused_with_the_number_still_needed(guarantee, risk_level):
    """Auditing the number of rows the error names certifies the confidence (for the per-event PAC bound, whose
    range grows with the rows seen, within a few rounds of following the advice)."""
    rows = synthetic_rows(1000, seed=1)
    n, rounds = 3, 0
    while True:
        try:
            recalibrate_rows(rows[:n], confidence=0.95, guarantee=guarantee, risk_level=risk_level)
            break
        except TooFewAuditedRowsError as error:
            more = int(str(error).split("audit ")[1].split(" more")[0])
            assert more >= 1
            n, rounds = n + more, rounds + 1
            assert n <= len(rows)
    assert rounds <= (2 if guarantee == "question" or risk_level is None else 4)


def test_the_per_question_minimum_is_exact():
    rows = synthetic_rows(40, seed=2)  # every row has a cue
    with pytest.raises(TooFewAuditedRowsError, match="audit 1 more rows"):
        recalibrate_rows(rows[:8], confidence=0.9, guarantee="question")  # 1/(8 + 1) > 0.1
    recalibrate_rows(rows[:9], confidence=0.9, guarantee="question")  # 1/(9 + 1) <= 0.1


def test_rows_scored_by_another_probe_are_refused(lynx):
    rows = synthetic_rows(30, probe="0123456789abcdef")
    with pytest.raises(LynxConfigError, match="another probe"):
        lynx.recalibrate(rows)


def test_recalibrated_lynx_keeps_probe_and_settings_and_starts_a_fresh_audit(lynx):
    base = Lynx.from_pretrained(organism.BUNDLE_DIR, confidence=0.8, guarantee="event", audit_rate=0.5,
                                audit_seed=3)
    base.audit_log = AuditLog(synthetic_rows(80, probe=probe_digest(base.probe)))
    new = base.recalibrate()
    assert new is not base and new.probe is base.probe and new.config is base.config
    assert (new.confidence, new.guarantee, new.risk_level, new.rule) == (0.8, "event", None, "envelope")
    assert (new.audit_rate, new.audit_seed) == (0.5, 3)
    assert len(new.audit_log) == 0 and len(base.audit_log) == 80
    assert new.calibration.n_questions == 80 and new.threshold != base.threshold
    r = new.metadata["recalibration"]
    assert (r["audited_rows"], r["labels"], r["settings"]["confidence"]) == (80, "agreement", 0.8)
    assert new.metadata["labels"] == {"probe": "gold", "calibration": "agreement"}
    assert new.metadata["problem_digests"]["calibration"][:2] == ["p0", "p1"]
    assert "test_realised_rates" not in new.metadata  # the old calibration's held-out rates do not describe it
    # settings can change in the same call
    other = base.recalibrate(confidence=0.7, guarantee="question", risk_level=0.1)
    assert (other.confidence, other.guarantee, other.risk_level) == (0.7, "question", 0.1)


def test_saved_recalibrated_bundle_says_where_its_calibration_came_from(lynx, tmp_path):
    new = lynx.recalibrate(synthetic_rows(60, probe=probe_digest(lynx.probe)))
    new.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "60 audited rows" in card and "by agreement" in card
    assert "changes the final answer" in card
    loaded = Lynx.from_pretrained(tmp_path)
    assert loaded.metadata["recalibration"]["rows_used"] == 60
    assert loaded.threshold == new.threshold


def test_cli_recalibrates_from_a_saved_audit_log(lynx, tmp_path, capsys):
    log = tmp_path / "audit.json"
    AuditLog(synthetic_rows(50, probe=probe_digest(lynx.probe))).save(log)
    assert cli(["recalibrate", "--audit-log", str(log), "--out", str(tmp_path / "b"), "--confidence", "0.8"]) == 0
    assert "recalibrated on 50 of 50 audited rows" in capsys.readouterr().out
    loaded = Lynx.from_pretrained(tmp_path / "b")
    assert loaded.metadata["recalibration"]["source"] == f"audit log {log}"
    assert cli(["recalibrate", "--audit-log", str(log), "--out", str(tmp_path / "c"), "--confidence", "0.999"]) == 2
    assert "more rows" in capsys.readouterr().err


def test_live_audit_rows_recalibrate_like_the_collected_table_of_the_same_traces():
    """Live: the rows the audit logs inside generate hold the same scores and agreement labels as collecting the
    same traces would, so recalibrating on them is calibrating on the collected table with agreement labels."""
    from lynx_hf.evaluation.audit_replay import replay_rows
    from lynx_hf.pipeline.collect import Collector
    from lynx_hf.pipeline.rollout import cut_at_eos

    model, tok = organism.load()
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok, audit_rate=1.0)
    problems = organism.problems("compare", "calibration", n=6)
    enc = tok([organism.prompt(tok, p["question"]) for p in problems], return_tensors="pt", padding=True,
              add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(**enc, stopping_criteria=[lynx.stopper()], do_sample=True,
                         temperature=organism.TEMPERATURE, top_p=0.95, max_new_tokens=600)
    lynx.answer(out)
    live = lynx.audit_log.rows
    eos = [model.generation_config.eos_token_id]

    class Given:
        name = "given"

        def generate(self, prompts, **_):
            return [cut_at_eos(row[enc.input_ids.shape[1]:].tolist(), eos) for row in out]

    c = lynx.config
    table = Collector(model, tok, layers=c.layers, cues=c.cues, think_start=c.think_start, think_end=c.think_end,
                      exit_text=c.exit_text, max_new_tokens=600, prompt_fn=organism.prompt,
                      rollout=Given()).collect_batch(problems, seed=0)
    replayed = replay_rows(table, lynx.probe.predict_proba(table.features).float(), lynx.threshold,
                           SETTINGS, probe=probe_digest(lynx.probe))
    assert [r.agrees for r in live] == [r.agrees for r in replayed]
    assert [r.prompt for r in live] == [r.prompt for r in replayed]
    for a, b in zip(live, replayed):
        assert a.scores == pytest.approx(b.scores, abs=1e-5)
    new = lynx.recalibrate(confidence=0.5)
    assert new.calibration.n_events == sum(len(r.scores) for r in live if r.agrees is not None)


# --- the guarantee after recalibration, over random draws of which rows are audited ---------------------------------
#
# The pool: the shipped (arithmetic) bundle's probe on organism compare traffic, one row per trace with its cues'
# scores and agreement labels (`benchmarks/recalibration.py --fixture`). The pool is the traffic: each draw audits
# N rows drawn uniformly (i.i.d.) from it, recalibrates on them, and measures the changed-answer rate the new
# threshold has on the whole pool, i.e. on fresh rows of the same traffic (the population rate, so the only noise is
# the draw's). Marginal: the mean over draws is at most δ; PAC: the share of draws above δ is at most α.

from pathlib import Path  # noqa: E402

AUDIT_FIXTURE = Path(__file__).parent / "fixtures" / "organism_compare_audit_rows.json"
AUDIT_DRAWS = 300
AUDITED = 200


@pytest.fixture(scope="module")
def pool():
    if not AUDIT_FIXTURE.exists():
        pytest.skip("run benchmarks/recalibration.py --fixture first")
    data = json.loads(AUDIT_FIXTURE.read_text())
    rows = [observe_row(SETTINGS, 0.9, "x", ["x" if a else "y" for a in r["agrees"]], torch.tensor(r["scores"]), -1)
            for r in data["rows"]]
    scores = torch.tensor([s for r in rows for s in r.scores], dtype=torch.float64)
    agrees = torch.tensor([a for r in rows for a in r.agrees], dtype=torch.bool)
    row_of = torch.tensor([i for i, r in enumerate(rows) for _ in r.scores])
    return rows, scores, agrees, row_of


def _pool_rate(pool, tau, guarantee):
    """The changed-answer rate of threshold `tau` on the whole pool: per question, rows whose first exit changes the
    answer; per event, answer-changing cues that exit."""
    from lynx_hf.runtime.conformal import exits, first_exit

    rows, scores, agrees, row_of = pool
    if guarantee == "event":
        return float(exits(scores[~agrees], tau).double().mean())
    first = first_exit(scores, row_of, tau)
    return float(((first >= 0) & ~agrees[first.clamp_min(0)]).double().sum()) / len(rows)


def _draw_rates(pool, guarantee, settings, seed):
    rows = pool[0]
    g = torch.Generator().manual_seed(seed)
    rates = {s: [] for s in settings}
    for _ in range(AUDIT_DRAWS):
        audited = [rows[i] for i in torch.randint(0, len(rows), (AUDITED,), generator=g).tolist()]
        for delta, alpha in settings:
            calibration = recalibrate_rows(audited, confidence=1 - delta, guarantee=guarantee,
                                           risk_level=alpha).calibration
            tau = calibration.threshold(1 - delta, guarantee, risk_level=alpha)
            rates[delta, alpha].append(_pool_rate(pool, tau, guarantee))
    return rates


@pytest.mark.parametrize("guarantee", ["question", "event"])
def test_recalibrated_changed_answer_rate_is_at_most_delta_on_average(pool, guarantee):
    settings = [(0.1, None), (0.2, None)]
    rates = _draw_rates(pool, guarantee, settings, seed=11)
    for delta, alpha in settings:
        values = torch.tensor(rates[delta, alpha], dtype=torch.float64)
        mean, sem = float(values.mean()), float(values.std()) / math.sqrt(AUDIT_DRAWS)
        print(f"per {guarantee}, δ={delta}: mean changed-answer rate {mean:.4f} over {AUDIT_DRAWS} draws of "
              f"{AUDITED} audited rows")
        assert mean <= delta + 3 * sem, (guarantee, delta, mean, sem)
        assert mean > delta / 4, "the recalibrated thresholds should not be vacuous"


@pytest.mark.parametrize("guarantee", ["question", "event"])
def test_recalibrated_pac_guarantee_exceeds_delta_in_at_most_alpha_of_draws(pool, guarantee):
    settings = [(0.1, 0.1), (0.1, None)]
    rates = _draw_rates(pool, guarantee, settings, seed=12)
    share = {s: sum(r > s[0] for r in rates[s]) / AUDIT_DRAWS for s in settings}
    print(f"per {guarantee}, δ=0.1: share of draws above δ: PAC α=0.1 {share[0.1, 0.1]:.3f}, marginal "
          f"{share[0.1, None]:.3f}")
    tolerance = 2.33 * math.sqrt(0.1 * 0.9 / AUDIT_DRAWS)  # one-sided 99%
    assert share[0.1, 0.1] <= 0.1 + tolerance, share
    assert share[0.1, None] > share[0.1, 0.1], "PAC thresholds should exceed δ less often than marginal ones"

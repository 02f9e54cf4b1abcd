"""From event tables to a shipped bundle: train the probe, calibrate it, measure it on held-out problems.

Splits are by problem, never by event: a trace's events all land in the same part (train / calibration / test).

Labels: every step takes `labels=None` (use the labels the table was collected with) or ``"gold"`` / ``"agreement"``
(relabel the table's forced answers without re-collecting, `events.relabel`). The bundle records which labels its
probe and its calibration used (`metadata["labels"]`), and its guarantee reads accordingly: gold labels bound how
often the exit makes the final answer wrong, agreement labels how often it changes it (`guarantee_statement`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch

from ..runtime.bundle import Lynx
from ..runtime.config import LynxConfig, short_digest
from ..runtime.conformal import Calibration, LynxCalibrationWarning, exits, first_exit
from .events import EventTable, check_same_settings, relabel, table_labels
from ..runtime.exit import exit_token_ids
from ..runtime.probe import LynxProbe, auroc, train_probe

logger = logging.getLogger(__name__)

REPORT_CONFIDENCES = (0.8, 0.9, 0.95)
REPORT_RISK_LEVELS = (None, 0.1)


def train(table: EventTable, *, seed: int = 0, labels: str | None = None, **probe_kwargs):
    """Train a probe on a table's events (problem-level validation split inside); returns (probe, report).

    Args:
        table: the training event table.
        seed: seeds the split and the initialisation.
        labels: None (the table's own labels), ``"gold"`` or ``"agreement"`` (the table is relabelled first).
        **probe_kwargs: passed to `train_probe`.

    Example:
        >>> from lynx_hf.pipeline.train import train  # doctest: +SKIP
        >>> probe, report = train(EventTable.load("events/train"))  # doctest: +SKIP
    """
    if len(table) == 0:
        raise ValueError("The event table has no cue events: collect more traces (or check the cue words).")
    if labels is not None:
        table = relabel(table, labels)
        if len(table) == 0:
            raise ValueError(f"No cue events left after relabelling with {labels} labels: collect more traces.")
    return train_probe(table.features, table.safe, table.groups, seed=seed, **probe_kwargs)


@torch.no_grad()
def score(probe: LynxProbe, table: EventTable) -> torch.Tensor:
    """Probe scores (float32, as at run time) of a table's events."""
    if len(table) == 0:
        return torch.zeros(0)
    return probe.predict_proba(table.features).float().cpu()


def calibrate(probe: LynxProbe, table: EventTable, labels: str | None = None) -> Calibration:
    """Split-conformal calibration from held-out events (scores as float32, as the plug-ins compute them); `labels`
    None uses the table's own labels, ``"gold"`` / ``"agreement"`` relabels it first."""
    if labels is not None:
        table = relabel(table, labels)
    if len(table) == 0:
        raise ValueError("The calibration table has no cue events: collect traces on more calibration problems.")
    table.check_order()
    return Calibration(scores=score(probe, table).double(), safe=table.safe.clone(), question=table.trace.clone())


def realised_rates(probe: LynxProbe, calibration: Calibration, table: EventTable,
                   confidences: Sequence[float] = REPORT_CONFIDENCES,
                   risk_levels: Sequence[float | None] = REPORT_RISK_LEVELS) -> list[dict]:
    """Premature-exit rates realised on held-out (test) events, per event and per question, at each confidence and
    risk level (None: the marginal guarantee; alpha: PAC). Each row names its `rule` and `risk_level`."""
    table.check_order()
    return rates_on_scores(score(probe, table).double(), table.safe, table.trace, table.n_traces, calibration,
                           confidences, risk_levels)


def rates_on_scores(scores: torch.Tensor, safe: torch.Tensor, trace: torch.Tensor, n_traces: int,
                    calibration: Calibration, confidences: Sequence[float] = REPORT_CONFIDENCES,
                    risk_levels: Sequence[float | None] = REPORT_RISK_LEVELS) -> list[dict]:
    """:func:`realised_rates` from the probe's scores on held-out events of `n_traces` traces (per-question rates
    count traces without a cue as not exiting)."""
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LynxCalibrationWarning)
        for risk_level in risk_levels:
            for c in confidences:
                row = {"confidence": c, "risk_level": risk_level, "rule": "envelope"}
                for guarantee in ("event", "question"):
                    tau = calibration.threshold(c, guarantee, risk_level=risk_level)
                    ex = exits(scores, tau)
                    unsafe = ~safe
                    first = first_exit(scores, trace, tau)
                    exited = first >= 0
                    premature = exited & ~safe[first.clamp_min(0)]
                    row[guarantee] = {
                        "tau": tau,
                        "unsafe_event_exit_rate": float(ex[unsafe].double().mean()) if bool(unsafe.any()) else 0.0,
                        "question_premature_rate": float(premature.double().sum() / max(n_traces, 1)),
                        "question_exit_rate": float(exited.double().sum() / max(n_traces, 1)),
                    }
                rows.append(row)
    return rows


def build_bundle(settings: dict, probe: LynxProbe, calibration: Calibration, tokenizer=None,
                 metadata: dict | None = None, **options) -> Lynx:
    """A `Lynx` bundle from collection settings (which pin model, layers, cues, exit text), a probe and a calibration."""
    config = LynxConfig(
        base_model=settings["base_model"], layers=list(settings["layers"]), hidden_size=int(settings["hidden_size"]),
        cues=list(settings["cues"]), think_start=settings["think_start"], think_end=settings["think_end"],
        exit_text=settings["exit_text"], exit_construction=settings["exit_construction"],
        probe_hidden_sizes=list(probe.hidden_sizes), model_fingerprint=settings["model_fingerprint"],
        tokenizer_fingerprint=settings["tokenizer_fingerprint"],
        weights_sample=list(settings.get("weights_sample", [])),
        layer_sample=dict(settings.get("layer_sample", {})),
        answer_max_new_tokens=int(settings.get("answer_max_new_tokens", 16)),
    )
    if tokenizer is not None:
        config.exit_token_ids = exit_token_ids(tokenizer, config.exit_text)
    return Lynx(config, probe, calibration, metadata=metadata, **options)


def prompt_digests(table: EventTable) -> list[str]:
    """One short digest per trace of its prompt token ids: the identity of a problem across tables, whatever its
    id (two benchmark splits may both number their problems from 0; the same question asked twice has one digest).

    Example:
        >>> prompt_digests(EventTable.empty({}, 1))
        []
    """
    return [short_digest(list(t["token_ids"][: t["prompt_length"]])) for t in table.traces]


def check_disjoint(a: Sequence[str], b: Sequence[str], what: str) -> None:
    """Raise if two lists of prompt digests share a problem (`what` names the two tables and the fix)."""
    shared = set(a) & set(b)
    if shared:
        raise ValueError(f"{len(shared)} problem(s) are in both {what}.")


_TRAIN_AND_CALIBRATION = ("the probe's training table and the calibration table: calibrate on problems the probe "
                          "never saw (collect them from another split or with other --seed/--n)")


def calibrate_bundle(probe: LynxProbe, calibration_table: EventTable, test_table: EventTable | None = None, *,
                     settings: dict | None = None, tokenizer=None, datasets: Sequence[str] = (),
                     train_note: str = "", validation_auroc: float | None = None,
                     train_digests: Sequence[str] = (), labels: str | None = None,
                     probe_labels: str | None = None, train_dropped: int | None = None) -> Lynx:
    """Calibrate a trained probe on held-out problems and package it; `test_table` adds realised rates.

    The bundle's metadata (shown in its model card) records the data, n, the labels of the probe and of the
    calibration, the traces dropped for lack of a full answer (agreement labels), the probe's AUROC on calibration
    and test events, the realised premature-exit rates on the test problems (with the calibration's labels, so they
    measure what the guarantee bounds), and the prompt digests of its training and calibration problems (so that
    evaluation can refuse a table that overlaps them). The calibration problems must be disjoint from the training
    ones (`train_digests`, see `prompt_digests`) and the test problems from both.

    Args:
        probe: the trained probe.
        calibration_table: held-out events to calibrate on.
        test_table: optional held-out events for the realised rates in the card.
        settings: the probe's collection settings (default: the calibration table's).
        tokenizer: to record the exit text's token ids.
        datasets: names for the model card.
        train_note: one line on the training data (`describe`).
        validation_auroc: the probe's validation AUROC.
        train_digests: prompt digests of the training problems (checked disjoint from calibration).
        labels: the calibration's labels: None (the calibration table's own) or ``"gold"`` / ``"agreement"``
            (relabelled); the test table is relabelled to match.
        probe_labels: the labels the probe was trained on (default: the probe's settings', else gold).
        train_dropped: training traces dropped for lack of a full answer (recorded in the metadata).

    Returns:
        The `Lynx` bundle.
    """
    settings = settings or calibration_table.settings  # as collected: the probe's labels, unless told
    probe_labels = probe_labels or settings.get("labels", "gold")
    if labels is not None:
        calibration_table = relabel(calibration_table, labels)
    labels = table_labels(calibration_table)
    check_same_settings(settings, calibration_table.settings, where="the probe's and the calibration settings")
    cal_digests = prompt_digests(calibration_table)
    check_disjoint(train_digests, cal_digests, _TRAIN_AND_CALIBRATION)
    calibration = calibrate(probe, calibration_table)
    metadata = {
        "datasets": list(datasets),
        "train": train_note,
        "probe_validation_auroc": validation_auroc,
        "calibration_auroc": _auroc_if_defined(calibration.scores, calibration.safe, "calibration"),
        "calibration_data": describe(calibration_table),
        # how the calibration traces were sampled: the guarantee is for traces sampled the same way
        "sampling": {k: calibration_table.settings[k] for k in ("temperature", "top_p")
                     if k in calibration_table.settings},
        "problem_digests": {"train": list(train_digests), "calibration": cal_digests},
        "labels": {"probe": probe_labels, "calibration": labels},
        "dropped_traces": {"train": train_dropped, "calibration": len(calibration_table.dropped)},
    }
    if test_table is not None:
        test_table = relabel(test_table, labels)
        metadata["dropped_traces"]["test"] = len(test_table.dropped)
    if test_table is not None and len(test_table):
        check_same_settings(settings, test_table.settings, where="the probe's and the test settings")
        check_test_disjoint(test_table, metadata, "the test event table")
        metadata["test"] = f"{len(test_table)} events from {test_table.n_traces} traces"
        metadata["test_questions"] = test_table.n_traces
        metadata["test_auroc"] = _auroc_if_defined(score(probe, test_table), test_table.safe, "test")
        metadata["test_realised_rates"] = realised_rates(probe, calibration, test_table)
    logger.info("Probe: calibration AUROC %s", metadata["calibration_auroc"])
    return build_bundle(settings, probe, calibration, tokenizer=tokenizer, metadata=metadata)


def _auroc_if_defined(scores: torch.Tensor, safe: torch.Tensor, part: str) -> float | None:
    """AUROC of the scores, or None (with a warning) where the events are all safe or all unsafe: the calibration
    itself is still valid there (conformal thresholds need no AUROC), only this summary is undefined."""
    if bool(safe.all()) or not bool(safe.any()):
        logger.warning("All %d %s events are %s: no AUROC to report.", len(safe), part,
                       "safe" if bool(safe.any()) else "unsafe")
        return None
    return auroc(scores, safe)


def fit(train_table: EventTable, calibration_table: EventTable, test_table: EventTable | None = None, *,
        seed: int = 0, tokenizer=None, datasets: Sequence[str] = (), labels: str | None = None,
        **probe_kwargs) -> Lynx:
    """Train on one table, calibrate on another (disjoint problems), report on a third: a ready bundle.

    `labels` None keeps each table's own labels; ``"gold"`` / ``"agreement"`` relabels all three (one kind of
    labels for the probe, the calibration and the test rates: never mixed)."""
    if labels is not None:
        train_table, calibration_table = relabel(train_table, labels), relabel(calibration_table, labels)
    check_same_settings(train_table.settings, calibration_table.settings)
    train_digests = prompt_digests(train_table)
    check_disjoint(train_digests, prompt_digests(calibration_table), _TRAIN_AND_CALIBRATION)  # before training
    probe, report = train(train_table, seed=seed, **probe_kwargs)
    return calibrate_bundle(probe, calibration_table, test_table, settings=train_table.settings, tokenizer=tokenizer,
                            datasets=datasets, train_note=describe(train_table), validation_auroc=report.val_auroc,
                            train_digests=train_digests, probe_labels=table_labels(train_table),
                            train_dropped=len(train_table.dropped))


def check_test_disjoint(table: EventTable, metadata: dict, name: str = "the evaluation table") -> None:
    """Raise if `table` holds a problem that a bundle (its `metadata`) was trained or calibrated on: rates measured
    there say nothing about held-out problems. Bundles saved before digests were recorded are not checked."""
    recorded = metadata.get("problem_digests") or {}
    digests = prompt_digests(table)
    for part in ("train", "calibration"):
        check_disjoint(recorded.get(part) or [], digests, f"the bundle's {part} problems and {name}: evaluate on "
                       "held-out problems (collect them from another split or with other --seed/--n)")


def load_probe_folder(folder) -> tuple[LynxProbe, dict]:
    """The probe and `probe.json` of a folder written by `lynx-hf train` (or a build), with an error naming the file
    and the fix for a missing or damaged one."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from ..errors import CorruptedBundleError

    folder = Path(folder)
    for name in ("probe.json", "probe.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: give a folder written by `lynx-hf train`.")
    try:
        meta = json.loads((folder / "probe.json").read_text(encoding="utf-8"))
        probe = LynxProbe(**meta["probe"])
        probe.load_state_dict(load_file(str(folder / "probe.safetensors")))
    except Exception as error:  # noqa: BLE001 - any failure here means a damaged folder, with one fix
        raise CorruptedBundleError(f"The probe in {folder} is unreadable ({type(error).__name__}: {error}); re-run "
                                   "`lynx-hf train` into a new --out.") from error
    return probe, meta


def describe(table: EventTable) -> str:
    """One line about a table: events, traces, share safe, and (agreement labels) traces dropped for lack of a full
    answer.

    Example:
        >>> describe(EventTable.empty({}, 1))
        '0 events from 0 traces (nan% safe)'
    """
    safe = float(table.safe.double().mean()) if len(table) else float("nan")
    line = f"{len(table)} events from {table.n_traces} traces ({safe:.1%} safe)"
    if table.settings.get("labels") == "agreement" or table.dropped:
        line = line[:-1] + f", {table_labels(table)} labels; {len(table.dropped)} traces dropped: no full answer)"
    return line

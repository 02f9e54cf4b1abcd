"""From event tables to a shipped bundle: train the probe, calibrate it, measure it on held-out problems.

Splits are by problem, never by event: a trace's events all land in the same part (train / calibration / test).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch

from .bundle import Lynx
from .config import LynxConfig
from .conformal import Calibration, LynxCalibrationWarning, exits, first_exit
from .events import EventTable, check_same_settings
from .exit import exit_token_ids
from .probe import LynxProbe, auroc, train_probe

logger = logging.getLogger(__name__)

REPORT_CONFIDENCES = (0.8, 0.9, 0.95)
REPORT_RISK_LEVELS = (None, 0.1)


def train(table: EventTable, *, seed: int = 0, **probe_kwargs):
    """Train a probe on a table's events (problem-level validation split inside); returns (probe, report).

    Example:
        >>> from lynx_hf.train import train  # doctest: +SKIP
        >>> probe, report = train(EventTable.load("events/train"))  # doctest: +SKIP
    """
    if len(table) == 0:
        raise ValueError("The event table has no cue events: collect more traces (or check the cue words).")
    return train_probe(table.features, table.safe, table.groups, seed=seed, **probe_kwargs)


@torch.no_grad()
def score(probe: LynxProbe, table: EventTable) -> torch.Tensor:
    """Probe scores (float32, as at run time) of a table's events."""
    if len(table) == 0:
        return torch.zeros(0)
    return probe.predict_proba(table.features).float().cpu()


def calibrate(probe: LynxProbe, table: EventTable) -> Calibration:
    """Split-conformal calibration from held-out events (scores as float32, as the plug-ins compute them)."""
    if len(table) == 0:
        raise ValueError("The calibration table has no cue events: collect traces on more calibration problems.")
    return Calibration(scores=score(probe, table).double(), safe=table.safe.clone(), question=table.trace.clone())


def realised_rates(probe: LynxProbe, calibration: Calibration, table: EventTable,
                   confidences: Sequence[float] = REPORT_CONFIDENCES,
                   risk_levels: Sequence[float | None] = REPORT_RISK_LEVELS) -> list[dict]:
    """Premature-exit rates realised on held-out (test) events, per event and per question, at each confidence and
    risk level (None: the marginal guarantee; alpha: PAC). Each row names its `rule` and `risk_level`."""
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


def calibrate_bundle(probe: LynxProbe, calibration_table: EventTable, test_table: EventTable | None = None, *,
                     settings: dict | None = None, tokenizer=None, datasets: Sequence[str] = (),
                     train_note: str = "", validation_auroc: float | None = None) -> Lynx:
    """Calibrate a trained probe on held-out problems and package it; `test_table` adds realised rates.

    The bundle's metadata (shown in its model card) records the data, n, the probe's AUROC on calibration and test
    events, and the realised premature-exit rates on the test problems.
    """
    settings = settings or calibration_table.settings
    check_same_settings(settings, calibration_table.settings, where="the probe's and the calibration settings")
    calibration = calibrate(probe, calibration_table)
    metadata = {
        "datasets": list(datasets),
        "train": train_note,
        "probe_validation_auroc": validation_auroc,
        "calibration_auroc": auroc(calibration.scores, calibration.safe),
        "calibration_data": describe(calibration_table),
    }
    if test_table is not None and len(test_table):
        check_same_settings(settings, test_table.settings, where="the probe's and the test settings")
        metadata["test"] = f"{len(test_table)} events from {test_table.n_traces} traces"
        metadata["test_questions"] = test_table.n_traces
        metadata["test_auroc"] = auroc(score(probe, test_table), test_table.safe)
        metadata["test_realised_rates"] = realised_rates(probe, calibration, test_table)
    logger.info("Probe: calibration AUROC %.3f", metadata["calibration_auroc"])
    return build_bundle(settings, probe, calibration, tokenizer=tokenizer, metadata=metadata)


def fit(train_table: EventTable, calibration_table: EventTable, test_table: EventTable | None = None, *,
        seed: int = 0, tokenizer=None, datasets: Sequence[str] = (), **probe_kwargs) -> Lynx:
    """Train on one table, calibrate on another (disjoint problems), report on a third: a ready bundle."""
    check_same_settings(train_table.settings, calibration_table.settings)
    overlap = {t["id"] for t in train_table.traces} & {t["id"] for t in calibration_table.traces}
    if overlap:
        raise ValueError(f"{len(overlap)} problems are in both the training and calibration tables: "
                         "calibrate on problems the probe never saw.")
    probe, report = train(train_table, seed=seed, **probe_kwargs)
    return calibrate_bundle(probe, calibration_table, test_table, settings=train_table.settings, tokenizer=tokenizer,
                            datasets=datasets, train_note=describe(train_table), validation_auroc=report.val_auroc)


def describe(table: EventTable) -> str:
    """One line about a table: events, traces, share safe."""
    safe = float(table.safe.double().mean()) if len(table) else float("nan")
    return f"{len(table)} events from {table.n_traces} traces ({safe:.1%} safe)"

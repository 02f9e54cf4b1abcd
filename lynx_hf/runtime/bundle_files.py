"""A bundle's files, on disk and on the Hub: `config.json` (`LynxConfig`), `model.safetensors` (probe weights and
feature normalisation), `calibration.json` (calibration scores, so any confidence is exact at run time), the
`custom_generate` recipe, and the model card rendered from `hub_cards/`. `Lynx.save_pretrained`, `from_pretrained`
and `push_to_hub` (huggingface_hub's `ModelHubMixin`) read and write them through this module.

Example:
    >>> from lynx_hf import organism
    >>> config, probe, calibration, metadata = read_bundle(organism.BUNDLE_DIR)
    >>> config.feature_size == probe.input_size
    True
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData, snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CorruptedBundleError
from .conformal import DEFAULT_LABELS, GUARANTEE_ORDER, Calibration, check_labels, guarantee_statement
from .config import LynxConfig
from .probe import LynxProbe

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CALIBRATION_NAME = "calibration.json"
BUNDLE_FILES = (CONFIG_NAME, WEIGHTS_NAME, CALIBRATION_NAME)
CARD_TEMPLATE = Path(__file__).parent.parent / "hub_cards" / "lynx_probe.md"
# transformers' generate-from-Hub recipe shipped in every bundle: `model.generate(custom_generate=<bundle>, ...)`.
CUSTOM_GENERATE_DIR = "custom_generate"
CUSTOM_GENERATE_SOURCE = Path(__file__).parent.parent / "custom_generate" / "generate.py"
CUSTOM_GENERATE_REQUIREMENTS = "lynx-hf\n"
CARD_CONFIDENCES = (0.8, 0.9, 0.95)
CARD_RISK_LEVELS = (None, 0.1)


def write_bundle(directory: Path, config: LynxConfig, probe: LynxProbe, calibration: Calibration,
                 metadata: dict) -> None:
    """Write a bundle's files (what `Lynx.save_pretrained` and `push_to_hub` upload) into `directory`."""
    directory = Path(directory)
    (directory / CONFIG_NAME).write_text(config.to_json_string(), encoding="utf-8")
    state = {k: v.detach().cpu().contiguous() for k, v in probe.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "library": "lynx-hf"})
    payload = {"calibration": calibration.to_dict(), "metadata": metadata}
    (directory / CALIBRATION_NAME).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    recipe = directory / CUSTOM_GENERATE_DIR
    recipe.mkdir(exist_ok=True)
    (recipe / "generate.py").write_bytes(CUSTOM_GENERATE_SOURCE.read_bytes())
    (recipe / "requirements.txt").write_text(CUSTOM_GENERATE_REQUIREMENTS, encoding="utf-8")


def read_bundle(name_or_path: str | os.PathLike, **hub_kwargs) -> tuple[LynxConfig, LynxProbe, Calibration, dict]:
    """`(config, probe, calibration, metadata)` of a bundle folder or Hub repo id (`hub_kwargs` go to
    `snapshot_download`), with a clear error for a missing or corrupted file."""
    folder = _resolve_folder(name_or_path, **hub_kwargs)
    config = LynxConfig.from_dict(_read_json(folder / CONFIG_NAME))
    probe = _load_probe(folder / WEIGHTS_NAME, config)
    payload = _read_json(folder / CALIBRATION_NAME)
    if "calibration" not in payload:
        raise CorruptedBundleError(f"{folder / CALIBRATION_NAME} is corrupted: no 'calibration' entry; re-save it.")
    return config, probe, Calibration.from_dict(payload["calibration"]), payload.get("metadata")


def bundle_labels(metadata: dict | None) -> dict[str, str]:
    """Which labels a bundle's probe and calibration used, from its metadata: ``{"probe": ..., "calibration": ...}``,
    each ``"gold"`` or ``"agreement"``. Bundles saved before labels were recorded read as gold.

    Args:
        metadata: the bundle's metadata (`Lynx.metadata`); its ``"labels"`` entry is such a dict or one label for
            both.

    Returns:
        The labels of the probe and of the calibration (the calibration's decide what the guarantee means:
        `guarantee_statement`).

    Example:
        >>> bundle_labels({}), bundle_labels({"labels": {"probe": "gold", "calibration": "agreement"}})["calibration"]
        ({'probe': 'gold', 'calibration': 'gold'}, 'agreement')
    """
    recorded = (metadata or {}).get("labels") or {}
    if isinstance(recorded, str):
        recorded = {"probe": recorded, "calibration": recorded}
    return {part: check_labels(recorded.get(part) or DEFAULT_LABELS) for part in ("probe", "calibration")}


def model_card(config: LynxConfig, calibration: Calibration, metadata: dict, info, **kwargs) -> ModelCard:
    """The card rendered from `hub_cards/lynx_probe.md` (`info`: the `ModelHubMixin` class info: tags and URLs); its
    guarantee is stated by `guarantee_statement` for the labels the calibration used (`bundle_labels`)."""
    meta = metadata or {}
    labels = bundle_labels(meta)
    data = ModelCardData(
        library_name="lynx-hf", license="apache-2.0", base_model=config.base_model,
        tags=list(info.model_card_data.tags or []), datasets=meta.get("datasets"),
        metrics=["auroc", "premature_exit_rate"],
    )
    test_rows = _card_test_rows(meta.get("test_realised_rates") or [])
    n_test = meta.get("test_questions")
    return ModelCard.from_template(
        card_data=data,
        template_str=CARD_TEMPLATE.read_text(encoding="utf-8"),
        config=config,
        calibration=calibration,
        table=_card_threshold_rows(calibration),
        metadata=meta,
        datasets=meta.get("datasets") or [],
        auroc_rows=[(name, f"{meta[key]:.3f}") for name, key in (
            ("validation", "probe_validation_auroc"), ("calibration", "calibration_auroc"), ("test", "test_auroc"))
            if isinstance(meta.get(key), (int, float))],
        test_rows=test_rows,
        test_data=meta.get("test") or "held-out problems",
        test_noise=(f"on {n_test} questions a per-question rate of 0.1 has a standard error of "
                    f"{math.sqrt(0.1 * 0.9 / n_test):.3f}" if n_test else "its rates vary around the true ones"),
        repo_url=info.repo_url,
        paper_url=info.paper_url,
        labels=labels,
        statements={g: guarantee_statement(labels["calibration"], g) for g in GUARANTEE_ORDER},
        dropped={k: v for k, v in (meta.get("dropped_traces") or {}).items() if v},
        **kwargs,
    )


def _strength(risk_level: float | None) -> str:
    return "marginal" if risk_level is None else f"PAC, α = {risk_level:g}"


def _card_threshold_rows(calibration: Calibration) -> list[dict]:
    """Threshold table rows for the card: per guarantee and strength, rates rounded to 3 decimals."""
    rows = []
    for guarantee in GUARANTEE_ORDER:
        for risk_level in CARD_RISK_LEVELS:
            for row in calibration.table(CARD_CONFIDENCES, guarantee, risk_level=risk_level):
                rows.append({
                    "confidence": f"{row['confidence']:g}", "guarantee": guarantee, "strength": _strength(risk_level),
                    "tau_text": "never exit" if math.isinf(row["tau"]) else f"{row['tau']:.4f}",
                    "exit_text": f"{row['exit_rate']:.3f}", "premature_text": f"{row['premature_rate']:.3f}",
                })
    return rows


def _card_test_rows(rates: Sequence[dict]) -> list[dict]:
    """`metadata["test_realised_rates"]` as rounded table rows. Rows without a `rule` come from bundles built when the
    paper's per-event rule was the only one."""
    rows = []
    for r in rates:
        if not isinstance(r, dict) or "event" not in r or "question" not in r:
            continue
        rows.append({
            "confidence": f"{r['confidence']:g}", "delta": f"{1 - r['confidence']:.2f}",
            "strength": _strength(r.get("risk_level")), "rule": r.get("rule", "paper"),
            "event": f"{r['event']['unsafe_event_exit_rate']:.3f}",
            "question": f"{r['question']['question_premature_rate']:.3f}",
            "exited": f"{r['question']['question_exit_rate']:.3f}",
        })
    return rows


def _resolve_folder(name_or_path, **hub_kwargs) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        folder = path
    elif path.exists() or str(name_or_path).startswith((".", "/")) or str(name_or_path).count("/") > 1:
        raise CorruptedBundleError(f"{name_or_path} is not a bundle folder: give a folder written by save_pretrained.")
    else:
        folder = Path(snapshot_download(
            repo_id=str(name_or_path), allow_patterns=[*BUNDLE_FILES, "README.md", "custom_generate/*"], **hub_kwargs,
        ))
    missing = [name for name in BUNDLE_FILES if not (folder / name).is_file()]
    if missing:
        raise CorruptedBundleError(
            f"{name_or_path} is not a complete Lynx bundle: missing {missing}. Re-save it with lynx.save_pretrained()."
        )
    return folder


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptedBundleError(f"{path} is corrupted ({error}); re-download or re-save the bundle.") from error


def _load_probe(path: Path, config: LynxConfig) -> LynxProbe:
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CorruptedBundleError(f"{path} is corrupted ({error}); re-download or re-save the bundle.") from error
    # Built on the meta device: no random initialisation, so loading a bundle never moves the global RNG (a
    # seeded sampling run gives the same tokens with or without Lynx loaded).
    with torch.device("meta"):
        probe = LynxProbe(config.feature_size, hidden_sizes=config.probe_hidden_sizes)
    try:
        probe.load_state_dict(state, assign=True)
    except RuntimeError as error:
        raise CorruptedBundleError(
            f"{path} does not match config.json (layers {config.layers}, hidden size {config.hidden_size}, probe "
            f"{config.probe_hidden_sizes}): {error}"
        ) from error
    return probe

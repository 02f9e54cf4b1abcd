"""The bundle on disk: save -> load round trip, model card, and the errors that say what to do."""

import json

import pytest
import torch
from huggingface_hub import ModelCard

from conftest import tiny_llama
from lynx_hf import BaseModelMismatchError, CorruptedBundleError, Lynx, LynxConfigError, LynxProbe
from scripted import bundle, scripted_model


@pytest.fixture(scope="module")
def parts(smollm2_tokenizer):
    model = scripted_model(smollm2_tokenizer)
    torch.manual_seed(0)
    lynx = bundle(model, smollm2_tokenizer, probe=LynxProbe(model.config.hidden_size * 2), metadata={"datasets": ["x"]})
    return model, smollm2_tokenizer, lynx


def test_save_load_round_trip_is_bit_identical(parts, tmp_path):
    model, tok, lynx = parts
    lynx.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "calibration.json", "config.json",
                                                          "custom_generate", "model.safetensors"]
    loaded = Lynx.from_pretrained(tmp_path, model=model, tokenizer=tok, confidence=0.8)
    features = torch.randn(64, lynx.config.feature_size)
    assert torch.equal(lynx.probe.predict_proba(features), loaded.probe.predict_proba(features))
    assert loaded.config == lynx.config
    for c in (0.6, 0.8, 0.9, 0.95):
        for guarantee in ("event", "question"):
            assert loaded.calibration.threshold(c, guarantee) == lynx.calibration.threshold(c, guarantee)
    assert torch.equal(loaded.calibration.scores, lynx.calibration.scores)


def test_model_card_has_valid_yaml_metadata_and_the_threshold_table(parts, tmp_path):
    _, _, lynx = parts
    lynx.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "lynx-hf"
    assert card.data.base_model == "tests/scripted"
    assert card.data.license == "apache-2.0"
    assert "early-exit" in card.data.tags
    assert "| 0.9 | per event |" in card.text and "| 0.9 | per question |" in card.text


def test_confidence_can_change_without_reloading_and_must_lie_in_zero_one(parts):
    _, _, lynx = parts
    assert lynx.guarantee == "question"  # the default: at most 1 - c of the questions get a premature exit
    for c in (0.6, 0.95):
        lynx.confidence = c
        assert lynx.threshold == lynx.calibration.threshold(c, "question")
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(LynxConfigError, match=r"\(0, 1\)"):
            lynx.confidence = bad
    with pytest.raises(LynxConfigError, match="question"):
        lynx.guarantee = "per-token"


def test_a_probe_for_another_base_model_is_refused_unless_explicitly_allowed(parts, tmp_path):
    model, tok, lynx = parts
    lynx.save_pretrained(tmp_path)
    other = tiny_llama(vocab_size=len(tok), num_hidden_layers=3, intermediate_size=48)  # same width, other arch
    with pytest.raises(BaseModelMismatchError, match="allow_base_model_mismatch=True"):
        Lynx.from_pretrained(tmp_path, model=other, tokenizer=tok)
    loaded = Lynx.from_pretrained(tmp_path, model=other, tokenizer=tok, allow_base_model_mismatch=True)
    assert loaded.model is other


def test_the_shipped_bundle_warns_on_other_weights_of_the_same_architecture():
    """A re-trained or differently fine-tuned checkpoint passes the architecture and tokenizer checks; the weights
    sample in config.json catches it (a warning: dtype casts of the calibrated checkpoint still pass)."""
    import copy
    import warnings

    from lynx_hf import organism

    model, tok = organism.load()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok)
        Lynx.from_pretrained(organism.BUNDLE_DIR, model=copy.deepcopy(model).to(torch.bfloat16), tokenizer=tok)
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        retrained.get_input_embeddings().weight.mul_(1.5)
    with pytest.warns(UserWarning, match="weights differ from the checkpoint the probe was calibrated on"):
        Lynx.from_pretrained(organism.BUNDLE_DIR, model=retrained, tokenizer=tok)


@pytest.fixture(scope="module")
def organism_model():
    from lynx_hf import organism

    return organism.load()


def _attach_warnings(model, tok, bundle_dir=None) -> list[str]:
    """The messages of the warnings that loading the shipped bundle (or `bundle_dir`) onto `model` raises."""
    import warnings

    from lynx_hf import organism

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Lynx.from_pretrained(bundle_dir or organism.BUNDLE_DIR, model=model, tokenizer=tok)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def _lora(model, **options):
    """A LoRA on q_proj and v_proj with B != 0, as after training (peft initialises B to 0, a no-op)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    wrapped = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **options))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return wrapped.eval()


FIX = "calibrate the probe on this model (`lynx-hf collect` + `lynx-hf calibrate`, or `lynx-hf build`)"


def test_the_shipped_bundle_warns_on_a_fine_tune_that_left_the_embeddings_alone(organism_model):
    """A fine-tune of the decoder layers only (frozen embeddings) passes the embedding sample; the sample of weights
    inside the layers in config.json catches it."""
    import copy

    model, tok = organism_model
    tuned = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        q = tuned.model.layers[2].self_attn.q_proj.weight
        q.add_(1e-2 * torch.randn_like(q))
    (message,) = _attach_warnings(tuned, tok)
    assert "weights differ from the checkpoint the probe was calibrated on" in message
    assert "inside the decoder layers" in message and FIX in message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_shipped_bundle_loads_without_warning_on_the_shipped_model_in_any_dtype(organism_model, dtype):
    import copy

    model, tok = organism_model
    assert _attach_warnings(copy.deepcopy(model).to(dtype), tok) == []


def test_the_shipped_bundle_warns_on_a_model_with_an_unmerged_lora_adapter(organism_model):
    import copy

    model, tok = organism_model
    wrapped = _lora(copy.deepcopy(model))
    (message,) = _attach_warnings(wrapped, tok)
    assert "active, unmerged adapter" in message and FIX in message
    with wrapped.disable_adapter():  # the adapter switched off: the calibrated model again
        assert _attach_warnings(wrapped, tok) == []


def test_the_shipped_bundle_warns_on_a_model_with_an_adapter_loaded_into_it(organism_model):
    """`model.load_adapter(...)`/`add_adapter` (transformers' PEFT integration) inject peft's adapter layers into the
    model itself (`peft.inject_adapter_in_model`, called directly here: transformers 5.24 asks peft >= 0.22)."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    model, tok = organism_model
    adapted = inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                                      copy.deepcopy(model))
    assert type(adapted) is type(model)
    (message,) = _attach_warnings(adapted, tok)
    assert "active, unmerged adapter" in message and FIX in message
    for module in adapted.modules():  # what `model.disable_adapters()` does
        if hasattr(module, "enable_adapters") and hasattr(module, "merged_adapters"):
            module.enable_adapters(False)
    assert _attach_warnings(adapted, tok) == []


def test_the_shipped_bundle_warns_on_a_model_with_a_merged_lora_adapter(organism_model):
    import copy

    model, tok = organism_model
    merged = _lora(copy.deepcopy(model)).merge_and_unload()
    assert type(merged) is type(model)
    (message,) = _attach_warnings(merged, tok)
    assert "inside the decoder layers" in message and FIX in message


def test_an_old_bundle_without_the_layer_sample_loads_without_warning(organism_model, tmp_path):
    import copy
    import shutil

    from lynx_hf import organism

    model, tok = organism_model
    old = tmp_path / "old"
    shutil.copytree(organism.BUNDLE_DIR, old)
    config = json.loads((old / "config.json").read_text())
    config.pop("layer_sample", None)
    (old / "config.json").write_text(json.dumps(config))
    assert _attach_warnings(model, tok, old) == []
    tuned = copy.deepcopy(model)  # not checked on the layers: an old bundle has no sample of them
    with torch.no_grad():
        tuned.model.layers[2].self_attn.q_proj.weight.mul_(1.1)
    assert _attach_warnings(tuned, tok, old) == []


def test_a_hidden_size_mismatch_is_refused_even_when_mismatch_is_allowed(parts, tmp_path):
    _, tok, lynx = parts
    lynx.save_pretrained(tmp_path)
    wider = tiny_llama(vocab_size=len(tok), hidden_size=64, num_hidden_layers=3)
    with pytest.raises(BaseModelMismatchError, match="Hidden-size mismatch"):
        Lynx.from_pretrained(tmp_path, model=wider, tokenizer=tok, allow_base_model_mismatch=True)


def test_a_tokenizer_that_cannot_spell_a_cue_is_refused(parts, tmp_path):
    model, tok, lynx = parts
    lynx.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["cues"] = ["wait", "ñandú"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {w: i for i, w in enumerate(["[UNK]", "wait", "hmm", "<think>", "</think>"])}
    backend = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    small = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(LynxConfigError, match="cannot spell"):
        Lynx.from_pretrained(tmp_path, model=model, tokenizer=small, allow_base_model_mismatch=True)


@pytest.mark.parametrize("damage", ["missing_weights", "garbled_config", "garbled_weights", "wrong_shape",
                                    "garbled_calibration", "config_missing_field"])
def test_corrupted_or_missing_files_are_clear_errors(parts, tmp_path, damage):
    model, tok, lynx = parts
    lynx.save_pretrained(tmp_path)
    if damage == "missing_weights":
        (tmp_path / "model.safetensors").unlink()
    elif damage == "garbled_config":
        (tmp_path / "config.json").write_text("{not json")
    elif damage == "garbled_weights":
        (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    elif damage == "wrong_shape":
        config = json.loads((tmp_path / "config.json").read_text())
        config["layers"] = [1, 2, 3]
        (tmp_path / "config.json").write_text(json.dumps(config))
    elif damage == "garbled_calibration":
        payload = json.loads((tmp_path / "calibration.json").read_text())
        del payload["calibration"]["scores"]
        (tmp_path / "calibration.json").write_text(json.dumps(payload))
    elif damage == "config_missing_field":
        config = json.loads((tmp_path / "config.json").read_text())
        del config["hidden_size"]
        (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises((CorruptedBundleError, ValueError), match="corrupted|missing|does not match|re-save"):
        Lynx.from_pretrained(tmp_path, model=model, tokenizer=tok)


def test_from_pretrained_of_a_path_that_is_not_a_bundle_says_so(tmp_path):
    with pytest.raises(CorruptedBundleError, match="missing"):
        Lynx.from_pretrained(tmp_path)


@pytest.mark.parametrize("bad", ["0.9", None, True, [0.9]])
def test_confidence_that_is_not_a_number_is_refused(parts, tmp_path, bad):
    _, _, lynx = parts
    lynx.save_pretrained(tmp_path)
    with pytest.raises(LynxConfigError, match="confidence must be a number"):
        Lynx.from_pretrained(tmp_path, confidence=bad)
    with pytest.raises(LynxConfigError, match="confidence must be a number"):
        lynx.confidence = bad


def test_risk_level_and_rule_pick_the_calibration_threshold(parts, tmp_path):
    _, _, lynx = parts
    lynx.save_pretrained(tmp_path)
    loaded = Lynx.from_pretrained(tmp_path, confidence=0.8, guarantee="question", risk_level=0.1, rule="paper")
    assert (loaded.risk_level, loaded.rule) == (0.1, "paper")
    assert loaded.threshold == loaded.calibration.threshold(0.8, "question", rule="paper", risk_level=0.1)
    loaded.guarantee, loaded.risk_level, loaded.rule = "event", None, "envelope"
    assert loaded.threshold == loaded.calibration.threshold(0.8, "event")
    with pytest.raises(LynxConfigError, match="risk_level"):
        loaded.risk_level = "0.1"
    with pytest.raises(LynxConfigError, match="rule"):
        Lynx.from_pretrained(tmp_path, rule="strict")


def test_model_card_states_guarantee_data_and_results_as_rounded_tables():
    import re

    from lynx_hf import organism

    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR)
    text = lynx.generate_model_card().text
    assert "500 calibration questions" in text and "risk_level=α" in text and "rule=\"paper\"" in text
    assert "| 0.9 | per question | PAC, α = 0.1 |" in text
    assert "## Held-out test results" in text and "| 0.9 | 0.10 | marginal | envelope |" in text
    assert f"| test | {lynx.metadata['test_auroc']:.3f} |" in text  # the bundle's own held-out AUROC, rounded
    assert not re.search(r"(?<![\d.])[01]\.\d{5,}", text), "numbers must be rounded"
    assert "{'" not in text and "': " not in text, "no raw Python dicts"


def test_a_bundle_without_recorded_labels_reads_as_gold_and_its_card_says_wrong(parts, tmp_path):
    from lynx_hf import bundle_labels, organism

    shipped = Lynx.from_pretrained(organism.BUNDLE_DIR)
    assert bundle_labels(shipped.metadata) == {"probe": "gold", "calibration": "gold"}
    card = " ".join(shipped.generate_model_card().text.split())
    assert "the exit makes the final answer wrong in at most 1 - c of questions" in card
    assert "changes the final answer" not in card


def test_agreement_labels_are_saved_loaded_and_stated_in_the_card(parts, tmp_path):
    from lynx_hf import bundle_labels, guarantee_statement

    model, tok, lynx = parts
    lynx = Lynx(lynx.config, lynx.probe, lynx.calibration,
                metadata={**lynx.metadata, "labels": {"probe": "agreement", "calibration": "agreement"},
                          "dropped_traces": {"train": 2, "calibration": 1}})
    lynx.save_pretrained(tmp_path)
    loaded = Lynx.from_pretrained(tmp_path, model=model, tokenizer=tok)
    assert bundle_labels(loaded.metadata) == {"probe": "agreement", "calibration": "agreement"}
    card = " ".join((tmp_path / "README.md").read_text(encoding="utf-8").split())
    assert guarantee_statement("agreement", "question") in card
    assert "the exit changes the final answer in at most 1 - c of questions" in card
    assert "makes the final answer wrong" not in card and "2 train, 1 calibration" in card


def test_the_guarantee_sentence_follows_labels_guarantee_confidence_and_risk_level():
    from lynx_hf import guarantee_statement

    assert guarantee_statement("gold", "question", 0.9).startswith(
        "the exit makes the final answer wrong in at most 1 - c = 0.1 of questions")
    assert guarantee_statement("agreement", "question", 0.95).startswith(
        "the exit changes the final answer in at most 1 - c = 0.05 of questions")
    assert "cues where an exit would change the final answer" in guarantee_statement("agreement", "event")
    assert "probability at least 1 - α = 0.9" in guarantee_statement("gold", "question", 0.9, risk_level=0.1)
    with pytest.raises(LynxConfigError, match="unknown labels"):
        guarantee_statement("silver")

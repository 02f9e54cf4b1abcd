"""Bundles on a real Hub server (olah on loopback), `push_to_hub` through huggingface_hub's own upload path, and the
`custom_generate` recipe every bundle ships (one-call exact exit), checked against stop mode + `lynx.answer`.

The Hub tests point the already-imported huggingface_hub at the local server by patching its endpoint constants
(`hub_server.hub_endpoint`, what `HF_ENDPOINT` does at import time), so `Lynx.from_pretrained("lynx/<name>")` and
`model.generate(custom_generate="lynx/<name>")` run their ordinary Hub code paths in this process.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.hf_api import CommitInfo, RepoUrl
from safetensors.torch import load, load_file

import lynx_hf
from lynx_hf import organism
from lynx_hf import Lynx
from lynx_hf.runtime.bundle_files import CUSTOM_GENERATE_SOURCE
from lynx_hf.runtime.exit import exit_cut
from hub_server import OlahServer, hub_endpoint, olah_executable
from scripted import PROMPT, SCRIPT, ScriptProcessor, bundle, calibration, scripted_model

REPO = "lynx/scripted-probe"
BUNDLE_FILES = ["README.md", "calibration.json", "config.json", "custom_generate/generate.py",
                "custom_generate/requirements.txt", "model.safetensors"]
SECOND_PROMPT = "<|im_start|>user\nHi there, a longer question?<|im_end|>\n<|im_start|>assistant\n<think>\n"
SECOND_SCRIPT = "Alternatively, hmm. Wait: 2. wait\n</think>\n\nFinal Answer: \\boxed{2}"


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module", autouse=True)
def modules_cache(tmp_path_factory):
    """transformers copies each `custom_generate/generate.py` it runs into its modules cache: keep those copies in a
    temporary folder rather than in ~/.cache/huggingface/modules."""
    import transformers.dynamic_module_utils as dynamic

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf-modules")))
        yield dynamic.HF_MODULES_CACHE


@pytest.fixture(scope="module")
def parts(smollm2_tokenizer, tmp_path_factory):
    """The scripted model, its prompt, and two saved calibrations of one probe (v1, v2)."""
    tok = smollm2_tokenizer
    model = scripted_model(tok)
    enc = tok(PROMPT, return_tensors="pt", add_special_tokens=False)
    v1 = bundle(model, tok, probability=0.99, metadata={"datasets": ["scripted"]})
    v2 = bundle(model, tok, probability=0.99, metadata={"datasets": ["scripted"]})
    v2.calibration = calibration(n=120, seed=1)
    folders = {}
    for name, lynx in (("v1", v1), ("v2", v2)):
        folders[name] = tmp_path_factory.mktemp(name)
        lynx.save_pretrained(folders[name])
    return model, tok, enc, folders


@pytest.fixture(scope="module")
def hub(parts, tmp_path_factory):
    """olah serving REPO (v1 committed) on a free loopback port; always stopped at the end."""
    if olah_executable() is None:
        pytest.skip("olah is not installed: `pip install -e '.[test]'`")
    _, _, _, folders = parts
    server = OlahServer(tmp_path_factory.mktemp("olah"))
    try:
        server.shas = [server.publish(REPO, folders["v1"], "v1")]
        server.start(health_repo=REPO)
        server.cache_dir = tmp_path_factory.mktemp("hf-cache")
        with hub_endpoint(server.endpoint):
            yield server
    finally:
        server.stop()


def _assert_same_bundle(loaded: Lynx, folder: Path) -> None:
    local = Lynx.from_pretrained(folder)
    assert loaded.config == local.config
    assert torch.equal(loaded.calibration.scores, local.calibration.scores)
    assert torch.equal(loaded.calibration.safe, local.calibration.safe)
    for c in (0.6, 0.8, 0.9, 0.95):
        for guarantee in ("event", "question"):
            assert loaded.calibration.threshold(c, guarantee) == local.calibration.threshold(c, guarantee)
    features = torch.randn(16, local.config.feature_size, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.probe.predict_proba(features), local.probe.predict_proba(features))


# ----- pull from a real Hub server --------------------------------------------------------------------------------
@pytest.mark.hub
def test_a_bundle_pulled_from_a_hub_server_is_bit_identical_to_the_local_one(parts, hub):
    model, tok, _, folders = parts
    assert not Path(REPO).exists()  # no local-path shortcut: this must go through snapshot_download
    loaded = Lynx.from_pretrained(REPO, model=model, tokenizer=tok, cache_dir=hub.cache_dir)
    try:
        _assert_same_bundle(loaded, folders["v1"])
        snapshot = hub.cache_dir / "models--lynx--scripted-probe" / "snapshots" / hub.shas[0]
        assert _files(snapshot) == BUNDLE_FILES
        assert (snapshot / "custom_generate" / "generate.py").read_bytes() == CUSTOM_GENERATE_SOURCE.read_bytes()
    finally:
        loaded.detach()


@pytest.mark.hub
def test_a_new_calibration_commit_is_picked_up_by_revision_and_the_old_commit_still_loads(parts, hub):
    model, tok, _, folders = parts
    if len(hub.shas) == 1:
        hub.shas.append(hub.publish(REPO, folders["v2"], "v2: new calibration"))
    old, new = hub.shas
    assert HfApi().model_info(REPO, revision="main").sha == new
    by_new = Lynx.from_pretrained(REPO, revision=new, cache_dir=hub.cache_dir)
    by_old = Lynx.from_pretrained(REPO, revision=old, cache_dir=hub.cache_dir)
    latest = Lynx.from_pretrained(REPO, cache_dir=hub.cache_dir)
    _assert_same_bundle(by_new, folders["v2"])
    _assert_same_bundle(by_old, folders["v1"])
    _assert_same_bundle(latest, folders["v2"])
    assert by_new.calibration.n_events != by_old.calibration.n_events


# ----- custom_generate: the exact exit in one generate call -------------------------------------------------------
def _stop_mode_reference(model, tok, enc, folder, scripts, prompt_lengths):
    """Stop mode + `lynx.answer`: per row (exit record, expected output tokens after the prompt)."""
    lynx = Lynx.from_pretrained(folder, model=model, tokenizer=tok)
    try:
        out = model.generate(**enc, logits_processor=[ScriptProcessor(tok, prompt_lengths, scripts)],
                             stopping_criteria=[lynx.stopper()], max_new_tokens=60, do_sample=False)
        records, answers = lynx.last_exits, lynx.answer(out)
    finally:
        lynx.detach()
    width = enc.input_ids.shape[1]
    expected = []
    for row, (record, answer) in enumerate(zip(records, answers)):
        assert record.exited
        cut = exit_cut(record.position, record.start, lynx.config.exit_construction)
        expected.append(out[row, width:cut].tolist() + lynx.exit_ids + answer.token_ids)
    return records, expected


@pytest.fixture(scope="module")
def single_reference(parts):
    """Stop mode + `lynx.answer` on the one-row prompt with the v1 bundle: (exit record, expected output tokens)."""
    model, tok, enc, folders = parts
    (record,), (expected,) = _stop_mode_reference(model, tok, enc, folders["v1"], [SCRIPT], [enc.input_ids.shape[1]])
    return record, expected


def _custom(model, tok, enc, source, scripts, prompt_lengths, **kwargs):
    kwargs = {"do_sample": False, **kwargs}
    return model.generate(**enc, custom_generate=source, trust_remote_code=True, tokenizer=tok,
                          logits_processor=[ScriptProcessor(tok, prompt_lengths, scripts)], max_new_tokens=60,
                          return_dict_in_generate=True, **kwargs)


def _generated(out, row: int, width: int, tok) -> list[int]:
    ids = out.sequences[row, width:].tolist()
    while ids and ids[-1] in (tok.pad_token_id, tok.eos_token_id):
        ids.pop()
    return ids


def test_every_saved_bundle_ships_the_custom_generate_recipe(parts):
    _, _, _, folders = parts
    folder = folders["v1"]
    assert _files(folder) == BUNDLE_FILES
    assert (folder / "custom_generate" / "generate.py").read_bytes() == CUSTOM_GENERATE_SOURCE.read_bytes()
    assert (folder / "custom_generate" / "requirements.txt").read_text().split() == ["lynx-hf"]
    source = CUSTOM_GENERATE_SOURCE.read_text()
    imports = {a.name.split(".")[0] for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import) for a in n.names}
    imports |= {n.module.split(".")[0] for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    assert imports <= {"__future__", "os", "sys", "dataclasses", "torch", "transformers", "lynx_hf"}


@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "temperature": 0.6, "top_p": 0.95}],
                         ids=["greedy", "sampling"])
def test_custom_generate_from_a_local_bundle_exits_like_stop_mode_plus_answer(parts, single_reference, sampling,
                                                                              modules_cache):
    model, tok, enc, folders = parts
    width = enc.input_ids.shape[1]
    record, expected = single_reference
    torch.manual_seed(0)
    out = _custom(model, tok, enc, str(folders["v1"]), [SCRIPT], [width], **sampling)  # the script forces the trace
    assert out.exits[0].exited and (out.exits[0].position, out.exits[0].start) == (record.position, record.start)
    assert out.exits[0].cue == "wait"
    assert list(Path(modules_cache).rglob("custom_generate/generate.py"))  # transformers ran the bundle's copy
    assert _generated(out, 0, width, tok) == expected
    text = tok.decode(expected)
    assert text.startswith("3 + 4 = 7.\n</think>") and "Wait" not in text  # the cue word is dropped


def test_custom_generate_with_left_padded_rows_exiting_at_different_cues_matches_stop_mode(parts):
    model, tok, _, folders = parts
    tok.padding_side = "left"
    enc = tok([PROMPT, SECOND_PROMPT], return_tensors="pt", padding=True, add_special_tokens=False)
    width = enc.input_ids.shape[1]
    scripts = [SCRIPT, SECOND_SCRIPT]
    records, expected = _stop_mode_reference(model, tok, enc, folders["v1"], scripts, [width, width])
    assert records[0].position != records[1].position
    out = _custom(model, tok, enc, str(folders["v1"]), scripts, [width, width])
    for row in range(2):
        assert (out.exits[row].position, out.exits[row].cue) == (records[row].position, records[row].cue)
        assert _generated(out, row, width, tok) == expected[row]


def test_custom_generate_in_shadow_mode_records_the_exit_but_decodes_like_plain_generate(parts):
    model, tok, enc, folders = parts
    width = enc.input_ids.shape[1]
    plain = model.generate(**enc, logits_processor=[ScriptProcessor(tok, [width], [SCRIPT])], max_new_tokens=60,
                           do_sample=False)
    out = _custom(model, tok, enc, str(folders["v1"]), [SCRIPT], [width], confidence=0.9, shadow=True)
    assert torch.equal(out.sequences, plain)
    assert out.exits[0].would_exit and not out.exits[0].exited


def test_custom_generate_from_a_local_folder_needs_trust_remote_code(parts):
    model, tok, enc, folders = parts
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        model.generate(**enc, custom_generate=str(folders["v1"]), trust_remote_code=False, tokenizer=tok,
                       max_new_tokens=5)


def test_custom_generate_refuses_beam_search_and_assisted_decoding(parts):
    model, tok, enc, folders = parts
    with pytest.raises(lynx_hf.UnsupportedGenerationError, match="num_beams=1"):
        _custom(model, tok, enc, str(folders["v1"]), [SCRIPT], [enc.input_ids.shape[1]], num_beams=2)
    with pytest.raises(lynx_hf.UnsupportedGenerationError, match="assistant_model"):
        _custom(model, tok, enc, str(folders["v1"]), [SCRIPT], [enc.input_ids.shape[1]], assistant_model=model)


@pytest.fixture(scope="module")
def organism_parts():
    model, tok = organism.load()
    questions = [p["question"] for p in organism.problems("arithmetic", "test", n=3)]
    enc = tok([organism.prompt(tok, q) for q in questions], return_tensors="pt", padding=True,
              add_special_tokens=False)
    return model, tok, enc


@pytest.mark.parametrize("options", [
    {"repetition_penalty": 1.3},
    {"no_repeat_ngram_size": 3},
    {"stop_strings": ["Wait"]},
    {"do_sample": True, "temperature": 0.7, "top_k": 20, "num_return_sequences": 2},
], ids=["repetition_penalty", "no_repeat_ngram_size", "stop_strings", "num_return_sequences"])
def test_custom_generate_options_act_as_in_plain_generate(organism_parts, options):
    model, tok, enc = organism_parts
    common = {"do_sample": False, "max_new_tokens": 80, **options}
    torch.manual_seed(0)
    plain = model.generate(**enc, tokenizer=tok, **common)
    torch.manual_seed(0)
    out = model.generate(**enc, custom_generate=str(organism.BUNDLE_DIR), trust_remote_code=True,
                         tokenizer=tok, shadow=True, return_dict_in_generate=True, **common)
    assert out.sequences.shape[0] == enc.input_ids.shape[0] * options.get("num_return_sequences", 1)
    assert torch.equal(out.sequences[:, : plain.shape[1]], plain)
    assert (out.sequences[:, plain.shape[1]:] == tok.pad_token_id).all()


@pytest.mark.parametrize("option", [{"output_scores": True}, {"cache_implementation": "static"},
                                    {"guidance_scale": 2.0}, {"prefill_chunk_size": 8}],
                         ids=lambda o: next(iter(o)))
def test_custom_generate_refuses_options_it_cannot_honour_by_name(organism_parts, option):
    model, tok, enc = organism_parts
    with pytest.raises(lynx_hf.UnsupportedGenerationError, match=next(iter(option))):
        model.generate(**enc, custom_generate=str(organism.BUNDLE_DIR), trust_remote_code=True,
                       tokenizer=tok, max_new_tokens=5, **option)


def test_custom_generate_applies_per_call_settings_to_a_given_lynx_for_that_call_only(organism_parts):
    model, tok, enc = organism_parts
    lynx = Lynx.from_pretrained(organism.BUNDLE_DIR, model=model, tokenizer=tok, confidence=0.9)
    common = dict(custom_generate=str(organism.BUNDLE_DIR), trust_remote_code=True, tokenizer=tok,
                  lynx=lynx, max_new_tokens=300, do_sample=False, return_dict_in_generate=True)
    live = model.generate(**enc, **common)
    assert any(r.exited for r in live.exits)
    shadow = model.generate(**enc, shadow=True, confidence=0.8, guarantee="event", **common)
    assert not any(r.exited for r in shadow.exits) and any(r.would_exit for r in shadow.exits)
    assert {r.threshold for r in shadow.exits} == {lynx.calibration.threshold(0.8, "event")}
    assert not lynx.shadow and lynx.confidence == 0.9 and lynx.guarantee == "question"


@pytest.mark.hub
def test_the_used_by_line_pulls_the_bundle_from_the_hub_and_attaches_on_first_use(parts, hub, tmp_path):
    model, tok, enc, folders = parts
    width = enc.input_ids.shape[1]
    reference = Lynx.from_pretrained(folders["v1"], model=model, tokenizer=tok)
    expected = model.generate(**enc, logits_processor=[ScriptProcessor(tok, [width], [SCRIPT])],
                              stopping_criteria=[reference.stopper()], max_new_tokens=60, do_sample=False)
    tok.save_pretrained(tmp_path)  # where the user's model was loaded from: its tokenizer lives there
    user_model = scripted_model(tok)
    user_model.name_or_path = user_model.config._name_or_path = str(tmp_path)
    lynx = Lynx.from_pretrained(REPO, revision=hub.shas[0], cache_dir=str(hub.cache_dir))
    out = user_model.generate(**enc, logits_processor=[ScriptProcessor(tok, [width], [SCRIPT])],
                              stopping_criteria=[lynx.stopper()], max_new_tokens=60, do_sample=False)
    assert torch.equal(out, expected) and lynx.model is user_model
    assert lynx.last_exits == reference.last_exits and lynx.last_exits[0].exited


@pytest.mark.hub
def test_custom_generate_from_the_hub_repo_loads_the_bundle_of_the_same_revision(parts, single_reference, hub):
    model, tok, enc, folders = parts
    width = enc.input_ids.shape[1]
    record, expected = single_reference
    out = _custom(model, tok, enc, REPO, [SCRIPT], [width], revision=hub.shas[0], cache_dir=str(hub.cache_dir))
    assert out.exits[0].position == record.position
    v1, v2 = Lynx.from_pretrained(folders["v1"]).threshold, Lynx.from_pretrained(folders["v2"]).threshold
    assert out.exits[0].threshold == v1 != v2
    assert _generated(out, 0, width, tok) == expected


@pytest.mark.hub
def test_the_offline_cache_serves_bundles_after_the_server_is_gone(parts, hub, monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    model, tok, _, folders = parts
    Lynx.from_pretrained(REPO, revision=hub.shas[0], cache_dir=hub.cache_dir)  # make sure this revision is cached
    latest = Lynx.from_pretrained(REPO, cache_dir=hub.cache_dir)
    hub.stop()
    cached = Lynx.from_pretrained(REPO, revision=hub.shas[0], cache_dir=hub.cache_dir, local_files_only=True)
    _assert_same_bundle(cached, folders["v1"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    offline = Lynx.from_pretrained(REPO, cache_dir=hub.cache_dir)
    assert torch.equal(offline.calibration.scores, latest.calibration.scores)
    with pytest.raises(LocalEntryNotFoundError):
        Lynx.from_pretrained(REPO, cache_dir=hub.cache_dir / "empty")


# ----- push_to_hub through huggingface_hub's upload path ----------------------------------------------------------
class _Captured:
    """Stands in for the Hub's write endpoints: records calls and uploaded bytes, never touches the network."""

    def __init__(self, monkeypatch, through_commit: bool):
        self.calls: dict[str, dict] = {}
        self.files: dict[str, bytes] = {}
        captured = self

        def create_repo(api, repo_id, **kwargs):
            captured.calls["create_repo"] = {"repo_id": repo_id, "token": api.token, **kwargs}
            return RepoUrl(f"https://huggingface.co/{repo_id}", endpoint="https://huggingface.co")

        def create_branch(api, repo_id, **kwargs):
            captured.calls["create_branch"] = {"repo_id": repo_id, **kwargs}

        def commit_info(repo_id):
            return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}", commit_message="",
                              commit_description="", oid="0" * 40)

        def upload_folder(api, **kwargs):
            folder = Path(kwargs["folder_path"])
            captured.calls["upload_folder"] = {"token": api.token, **kwargs}
            captured.files = {p: (folder / p).read_bytes() for p in _files(folder)}
            return commit_info(kwargs["repo_id"])

        def create_commit(api, repo_id, operations, **kwargs):
            captured.calls["create_commit"] = {"repo_id": repo_id, "token": api.token, **kwargs}
            captured.files = {}
            for op in operations:
                source = op.path_or_fileobj
                captured.files[op.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
            return commit_info(repo_id)

        def validate_yaml(api, content, **kwargs):  # the Hub's server-side check of the card's YAML header
            captured.calls["validate_yaml"] = {"content": content, **kwargs}
            if ModelCard(content).data.library_name != "lynx-hf":  # offline stand-in: the YAML header parses
                raise ValueError("invalid model card metadata")

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        if through_commit:  # let the real upload_folder build the operations (single-commit path)
            monkeypatch.setattr("huggingface_hub.hf_api.is_xet_available", lambda: False)
            monkeypatch.setattr(HfApi, "create_commit", create_commit)
            monkeypatch.setattr(HfApi, "_validate_yaml", validate_yaml)
        else:
            monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


@pytest.mark.parametrize("through_commit", [False, True], ids=["upload_folder", "create_commit"])
def test_push_to_hub_uploads_exactly_what_save_pretrained_writes_plus_the_card(parts, monkeypatch, through_commit):
    _, _, _, folders = parts
    lynx = Lynx.from_pretrained(folders["v1"])
    hub = _Captured(monkeypatch, through_commit)
    url = lynx.push_to_hub("me/probe", private=True, token="hf_test", commit_message="calibrate v1")
    assert "me/probe" in str(url)
    assert sorted(hub.files) == BUNDLE_FILES
    for name in BUNDLE_FILES:
        if name not in ("README.md", "model.safetensors"):
            assert hub.files[name] == (folders["v1"] / name).read_bytes(), name
    # safetensors writes its header metadata in hash order, so compare the tensors rather than the bytes
    pushed, local = load(hub.files["model.safetensors"]), load_file(folders["v1"] / "model.safetensors")
    assert pushed.keys() == local.keys() and all(torch.equal(pushed[k], local[k]) for k in local)
    assert hub.calls["create_repo"]["private"] is True and hub.calls["create_repo"]["token"] == "hf_test"
    call = hub.calls["create_commit" if through_commit else "upload_folder"]
    assert call["commit_message"] == "calibrate v1" and call["revision"] is None and not call["create_pr"]
    assert "create_branch" not in hub.calls
    assert 'Lynx.from_pretrained("me/probe"' in hub.files["README.md"].decode()
    if through_commit:
        assert hub.calls["validate_yaml"]["content"] == hub.files["README.md"].decode()


def test_push_to_a_branch_creates_it_and_a_pull_request_targets_it(parts, monkeypatch):
    _, _, _, folders = parts
    lynx = Lynx.from_pretrained(folders["v1"])
    hub = _Captured(monkeypatch, through_commit=False)
    lynx.push_to_hub("me/probe", branch="calibration-v2")
    assert hub.calls["create_branch"] == {"repo_id": "me/probe", "branch": "calibration-v2", "exist_ok": True}
    assert hub.calls["upload_folder"]["revision"] == "calibration-v2"
    hub = _Captured(monkeypatch, through_commit=False)
    lynx.push_to_hub("me/probe", branch="main", create_pr=True)
    assert "create_branch" not in hub.calls
    assert hub.calls["upload_folder"]["create_pr"] is True and hub.calls["upload_folder"]["revision"] == "main"


def test_pushed_model_card_has_hub_metadata_and_a_runnable_usage_snippet(parts, monkeypatch):
    _, _, _, folders = parts
    lynx = Lynx.from_pretrained(folders["v1"])
    hub = _Captured(monkeypatch, through_commit=False)
    lynx.push_to_hub("me/probe")
    card = ModelCard(hub.files["README.md"].decode())
    assert card.data.library_name == "lynx-hf"
    assert card.data.base_model == "tests/scripted"
    assert card.data.license == "apache-2.0"
    assert {"lynx", "early-exit", "conformal-prediction"} <= set(card.data.tags)
    assert card.data.datasets == ["scripted"]
    assert card.data.metrics == ["auroc", "premature_exit_rate"]
    blocks = re.findall(r"```python\n(.*?)```", card.text, flags=re.S)
    assert blocks, "the card has no python usage block"
    for block in blocks:
        ast.parse(block)
    assert 'Lynx.from_pretrained("me/probe"' in blocks[0]

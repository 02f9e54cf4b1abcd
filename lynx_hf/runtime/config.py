"""`LynxConfig`: what a probe bundle needs to run on its base model, saved as `config.json`, and base-model fingerprints."""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from dataclasses import asdict, dataclass, field, fields

from .cues import DEFAULT_CUES
from ..errors import BaseModelMismatchError, CorruptedBundleError, LynxConfigError
from .exit import EXIT_CONSTRUCTIONS

FORMAT_VERSION = 1
_CONFIG_KEYS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "vocab_size", "rope_theta", "max_position_embeddings", "tie_word_embeddings",
)


@dataclass
class LynxConfig:
    """Everything about a probe bundle except its weights and calibration scores.

    Its repr shows the settings a reader needs (base model, layers, cues, thinking markers, exit text) and leaves out
    the base-model fingerprints and token-id tables, which are still saved and checked on load.

    Example:
        >>> config = LynxConfig(base_model="my/model", layers=[2, 4], hidden_size=128)
        >>> LynxConfig.from_dict(config.to_dict()) == config
        True
    """

    base_model: str
    layers: list[int]
    hidden_size: int
    cues: list[str] = field(default_factory=lambda: list(DEFAULT_CUES))
    # None: taken from the model's tokenizer and chat template when the bundle is attached (`lynx_hf.runtime.thinking`).
    think_start: str | None = None
    think_end: str | None = None
    exit_text: str | None = None
    thinking: str | None = None
    exit_construction: str = "drop_cue"
    probe_hidden_sizes: list[int] = field(default_factory=lambda: [256, 64])
    # The base-model fingerprints and token-id tables: saved, compared and checked on load, but left out of the repr
    # (hundreds of numbers that say nothing to a reader).
    model_fingerprint: str = field(default="", repr=False)
    tokenizer_fingerprint: str = field(default="", repr=False)
    weights_sample: list[float] = field(default_factory=list, repr=False)
    # A few values of matrices inside the first, middle and last decoder blocks (`layer_sample`); empty in bundles
    # made before it existed, which are then not checked on it.
    layer_sample: dict[str, list[float]] = field(default_factory=dict, repr=False)
    cue_token_ids: dict[str, list[int]] = field(default_factory=dict, repr=False)
    exit_token_ids: list[int] = field(default_factory=list, repr=False)
    answer_max_new_tokens: int = 16
    format_version: int = FORMAT_VERSION
    library_name: str = "lynx-hf"

    def __post_init__(self) -> None:
        if self.exit_construction not in EXIT_CONSTRUCTIONS:
            raise LynxConfigError(
                f"exit_construction={self.exit_construction!r} is unknown: use one of {EXIT_CONSTRUCTIONS}."
            )
        if not self.layers:
            raise LynxConfigError("A LynxConfig needs at least one layer index.")
        if not self.cues:
            raise LynxConfigError("A LynxConfig needs at least one cue word.")

    @property
    def feature_size(self) -> int:
        """Size of the probe's input: the chosen layers' hidden states concatenated."""
        return self.hidden_size * len(self.layers)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LynxConfig":
        """Build from `to_dict()` output, with a clear error for a missing field or a newer format."""
        if not isinstance(data, dict):
            raise CorruptedBundleError("config.json is corrupted: expected a JSON object; re-save the bundle.")
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise CorruptedBundleError(
                f"config.json has format_version {version}, newer than this lynx-hf ({FORMAT_VERSION}): "
                "upgrade lynx-hf (`pip install -U lynx-hf`)."
            )
        known = {f.name for f in fields(cls)}
        missing = [name for name in ("base_model", "layers", "hidden_size") if name not in data]
        if missing:
            raise CorruptedBundleError(f"config.json is corrupted: missing field(s) {missing}; re-save the bundle.")
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _close(a: list[float], b: list[float], rtol: float = 1e-2, atol: float = 1e-4) -> bool:
    """Equal up to dtype casts (fp32 / bf16 / fp16 loads of one checkpoint agree within rtol)."""
    return len(a) == len(b) and all(abs(x - y) <= atol + rtol * abs(y) for x, y in zip(a, b))


def short_digest(payload) -> str:
    """16 hex digits of the SHA-256 of `payload` as sorted JSON: the fingerprints' and problem digests' hash.

    Example:
        >>> short_digest([1, 2, 3])
        'a36b1f2c3f84522d'
    """
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(model) -> str:
    """A short hash of the base model's architecture settings (not its weights): catches a probe for another model.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> small = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2))
        >>> len(model_fingerprint(small))
        16
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return short_digest({key: getattr(config, key, None) for key in _CONFIG_KEYS})


def weights_sample(model, n: int = 32) -> list[float]:
    """`n` evenly strided values from each of the input and output embedding matrices: tells apart two checkpoints
    of one architecture (a re-trained model, another fine-tune) where `model_fingerprint` cannot. Offloaded
    (meta) weights contribute nothing.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> small = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2))
        >>> len(weights_sample(small, n=8))
        16
    """
    values: list[float] = []
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        weight = getattr(module, "weight", None)
        if weight is None or weight.device.type == "meta":
            continue
        flat = weight.detach().reshape(-1)
        values += [round(v, 6) for v in flat[:: max(1, flat.numel() // n)][:n].float().tolist()]
    return values


_SAMPLED_DTYPES = ("float16", "bfloat16", "float32", "float64")  # not quantised (int, fp8 + scale) storage


def layer_sample(model, n: int = 8) -> dict[str, list[float]]:
    """`n` evenly strided values of every weight matrix (2-D or more) in the first, middle and last decoder blocks,
    by parameter name within the blocks (`"2.self_attn.q_proj.weight"`): tells apart a fine-tune that left the
    embeddings alone (a merged LoRA, frozen embeddings) from its base, where `weights_sample` cannot.

    Adapters are read through: a peft-wrapped layer contributes its base weight (under the base name), not the
    adapter's. Offloaded (meta) and quantised (integer, fp8) weights are left out, so `check_base_model` compares
    only the names present in both samples.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> small = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2))
        >>> sorted(layer_sample(small, n=4))[:2]
        ['0.mlp.down_proj.weight', '0.mlp.gate_proj.weight']
    """
    from .capture import decoder_blocks

    try:
        blocks = decoder_blocks(model)
    except LynxConfigError:  # an unusual layout: no sample, so no check on it
        return {}
    sample: dict[str, list[float]] = {}
    for index in sorted({0, len(blocks) // 2, len(blocks) - 1}):
        for name, weight in _base_parameters(blocks[index], f"{index}."):
            if weight.ndim < 2 or weight.device.type == "meta" or str(weight.dtype).removeprefix("torch.") \
                    not in _SAMPLED_DTYPES:
                continue
            flat = weight.detach().reshape(-1)
            sample[name] = [float(f"{v:.6g}") for v in flat[:: max(1, flat.numel() // n)][:n].float().tolist()]
    return sample


def _base_parameters(module, prefix: str):
    """`module`'s parameters by name, reading through peft's adapter wrappers to the base layer they wrap."""
    base = getattr(module, "base_layer", None)  # a peft tuner layer (LoRA, ...) around the original module
    if base is None and hasattr(module, "active_adapters"):
        base = getattr(module, "original_module", None)  # peft's modules_to_save wrapper
    if base is not None and hasattr(module, "active_adapters"):
        yield from _base_parameters(base, prefix)
        return
    for name, param in module.named_parameters(recurse=False):
        yield prefix + name, param
    for name, child in module.named_children():
        yield from _base_parameters(child, f"{prefix}{name}.")


def _layer_sample_differs(model, reference: dict[str, list[float]]) -> bool:
    """Whether a value in a matrix sampled in both differs beyond a dtype cast (bf16 rounds to 2^-8 relative)."""
    sample = layer_sample(model, n=len(next(iter(reference.values()), [])) or 8)
    shared = sample.keys() & reference.keys()
    return any(not _close(sample[k], reference[k], rtol=5e-3, atol=1e-6) for k in shared)


def active_adapters(model) -> list[str]:
    """Names of the adapters (peft: LoRA and the like) that change what `model` computes: active, not disabled and
    not merged into the base weights. Adapters come from `peft.get_peft_model`/`PeftModel.from_pretrained` or from
    transformers' `model.load_adapter`/`add_adapter`.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> active_adapters(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2)))
        []
    """
    if "peft" not in sys.modules:  # no adapter without peft
        return []
    names: dict[str, None] = {}
    for module in model.modules():
        if not hasattr(module, "active_adapters") or getattr(module, "disable_adapters", True) is not False:
            continue
        if not (hasattr(module, "merged_adapters") or hasattr(module, "original_module")):
            continue  # peft's PeftModel / tuner model objects themselves: their layers are looked at one by one
        active = module.active_adapters
        active = [active] if isinstance(active, str) else list(active or [])
        merged = set(getattr(module, "merged_adapters", ()))
        names.update(dict.fromkeys(a for a in active if a not in merged))
    config = getattr(model, "active_peft_config", None)  # prompt learning (prefix/prompt tuning) has no layers
    if getattr(config, "is_prompt_learning", False) and not names:
        names[str(getattr(model, "active_adapter", "prompt"))] = None
    return list(names)


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary (tokens, ids and added tokens)."""
    return short_digest(sorted(tokenizer.get_vocab().items()))


def model_hidden_size(model) -> int:
    """The base model's hidden size."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.hidden_size)


def weight_differences(config: LynxConfig, model) -> list[str]:
    """How `model`'s weights differ from those `config` was calibrated on, beyond dtype casts (empty: they agree, or
    the bundle holds no sample to compare)."""
    differences = []
    if config.weights_sample and not _close(weights_sample(model), config.weights_sample):
        differences.append("its embedding weights differ (another checkpoint or a re-trained model of this "
                           "architecture, or a lossy quantisation)")
    if config.layer_sample and _layer_sample_differs(model, config.layer_sample):
        differences.append("weights inside the decoder layers differ (a fine-tune: a merged LoRA, or a fine-tune "
                           "that left the embeddings alone)")
    adapters = active_adapters(model)
    if adapters:
        differences.append(f"it carries an active, unmerged adapter ({', '.join(map(repr, adapters))}: a peft LoRA "
                           "or the like) that changes what its layers compute; switch it off "
                           "(`model.disable_adapters()`, `with peft_model.disable_adapter():`) to run the calibrated "
                           "model")
    return differences


def check_base_model(config: LynxConfig, model, tokenizer, allow_mismatch: bool = False) -> list[str]:
    """Raise `BaseModelMismatchError` if `model`/`tokenizer` are not the base the bundle was trained for.

    A hidden-size mismatch always raises (the probe cannot read the features). A fingerprint mismatch raises unless
    `allow_mismatch=True`, in which case the differences are returned so the caller can warn.
    """
    hidden = model_hidden_size(model)
    if hidden != config.hidden_size:
        raise BaseModelMismatchError(
            f"Hidden-size mismatch: the probe reads hidden size {config.hidden_size} ({config.base_model}) but this "
            f"model has {hidden}. Load the probe trained for this model, or train one with `lynx-hf collect/train`."
        )
    problems = []
    if config.model_fingerprint and config.model_fingerprint != model_fingerprint(model):
        problems.append("model architecture fingerprint differs")
    if config.tokenizer_fingerprint and config.tokenizer_fingerprint != tokenizer_fingerprint(tokenizer):
        problems.append("tokenizer vocabulary fingerprint differs")
    # Same architecture and vocabulary, other weights (a re-trained model, another fine-tune, an adapter): warn, since
    # dtype casts and quantisations of the calibrated checkpoint are legitimate and also move the weights a little.
    if not problems:
        differences = weight_differences(config, model)
        if differences:
            warnings.warn(
                f"This model's weights differ from the checkpoint the probe was calibrated on ({config.base_model}): "
                + "; ".join(differences) + ". The probe still runs, but its calibration guarantee holds only for the "
                "calibrated weights; load that checkpoint (without adapters), or calibrate the probe on this model "
                "(`lynx-hf collect` + `lynx-hf calibrate`, or `lynx-hf build`).",
                UserWarning, stacklevel=3,
            )
    if problems and not allow_mismatch:
        raise BaseModelMismatchError(
            f"This probe was trained for {config.base_model!r} but the model given looks different ("
            + "; ".join(problems)
            + "). Use the probe made for this model, or pass allow_base_model_mismatch=True to use it anyway "
            "(its calibration guarantee then does not hold)."
        )
    return problems

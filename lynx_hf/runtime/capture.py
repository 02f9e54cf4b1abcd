"""Hidden-state capture with forward hooks: the features the probe reads, without `output_hidden_states=True`.

Layer indices follow the `output_hidden_states` convention of transformers: 0 is the embedding output, `i` is the
output of decoder block `i` (1-based), and the last index `L` is taken *after the final norm*, as HF decoder models
return it. Requesting `output_hidden_states=True` inside `generate` would keep every layer of every step; the hooks
here keep only the chosen layers at the last position of each row, on the layer's own device.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import LynxConfigError

_LAYER_LIST_NAMES = ("layers", "h", "blocks", "layer")
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_norm", "norm_f")


def num_hidden_layers(model: nn.Module) -> int:
    """Number of decoder blocks of a HF causal LM (`config.num_hidden_layers`, or the text config's).

    Args:
        model: A transformers causal LM (multimodal models are read through their text config).

    Returns:
        The number of decoder blocks.

    Raises:
        LynxConfigError: If the model's config has no `num_hidden_layers` (not a HF decoder-only causal LM).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2))
        >>> num_hidden_layers(model)
        2
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n = getattr(config, "num_hidden_layers", None)
    if n is None:
        raise LynxConfigError(
            f"{type(model).__name__} has no `config.num_hidden_layers`; lynx-hf supports HF decoder-only causal LMs."
        )
    return int(n)


def _decoder(model: nn.Module) -> nn.Module:
    return model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "base_model", model)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a HF causal LM, in order (`model.model.layers` for Llama, `transformer.h` for GPT-2).

    Args:
        model: A transformers causal LM.

    Returns:
        The `nn.ModuleList` of its `num_hidden_layers` decoder blocks.

    Raises:
        LynxConfigError: If no module list of that length is found under the usual names.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2))
        >>> len(decoder_blocks(model))
        2
    """
    n = num_hidden_layers(model)
    decoder = _decoder(model)
    blocks = next(
        (getattr(decoder, name) for name in _LAYER_LIST_NAMES
         if isinstance(getattr(decoder, name, None), nn.ModuleList) and len(getattr(decoder, name)) == n),
        None,
    )
    if blocks is None:
        raise LynxConfigError(
            f"Could not find the {n} decoder blocks of {type(model).__name__} (looked for "
            f"{', '.join(_LAYER_LIST_NAMES)} on {type(decoder).__name__}); lynx-hf supports HF decoder-only causal LMs."
        )
    return blocks


def layer_modules(model: nn.Module, layers: Sequence[int]) -> list[nn.Module]:
    """The module whose output is `hidden_states[i]` for each index `i` (see the module docstring).

    Index 0 maps to the input embeddings, `i` to decoder block `i`, and the last index to the final norm (when the
    model has one), matching `output_hidden_states`.

    Args:
        model: A transformers causal LM.
        layers: Layer indices in the `output_hidden_states` convention, each in `0..num_hidden_layers`.

    Returns:
        One module per index, in the order given.

    Raises:
        LynxConfigError: If an index is out of range, or the model's blocks cannot be found.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2))
        >>> [type(m).__name__ for m in layer_modules(model, [0, 1, 2])]
        ['Embedding', 'LlamaDecoderLayer', 'LlamaRMSNorm']
    """
    n = num_hidden_layers(model)
    decoder = _decoder(model)
    blocks = decoder_blocks(model)
    final_norm = next((getattr(decoder, name) for name in _FINAL_NORM_NAMES if hasattr(decoder, name)), None)
    modules = []
    for index in layers:
        if not 0 <= index <= n:
            raise LynxConfigError(
                f"Layer index {index} is out of range for a model with {n} blocks: use 0..{n} "
                "(output_hidden_states convention: 0 = embeddings, i = block i, n = after the final norm)."
            )
        if index == 0:
            modules.append(model.get_input_embeddings())
        elif index == n and final_norm is not None:
            modules.append(final_norm)
        else:
            modules.append(blocks[index - 1])
    return modules


def default_layers(model: nn.Module) -> tuple[int, ...]:
    """The reference code's choice of probe layers: about 1/3, 1/2 and 3/4 of the depth plus the last.

    Args:
        model: A transformers causal LM.

    Returns:
        Sorted, distinct layer indices, e.g. `(9, 14, 21, 28)` for 28 blocks.

    Raises:
        LynxConfigError: If the model's config has no `num_hidden_layers`.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2))
        >>> default_layers(model)
        (1, 2)
    """
    n = num_hidden_layers(model)
    return tuple(sorted({max(1, round(n / 3)), max(1, round(n / 2)), max(1, round(3 * n / 4)), n}))


class HiddenStateCapture:
    """Forward hooks that keep the chosen layers' hidden states for the probe.

    With `last_only=True` (decoding) each hook keeps `[batch, hidden]` at the last position of the forward's input,
    i.e. the token fed at this step; with `last_only=False` (teacher-forced feature extraction) it keeps
    `[batch, seq, hidden]`. `features()` concatenates the layers on `device`. Only forwards run in the thread that
    made it are captured (another thread generating on the same model meanwhile leaves it alone). Use as a context
    manager or call `remove()`.

    Args:
        model: A transformers causal LM; hooks are registered on the modules of `layers`.
        layers: Layer indices in the `output_hidden_states` convention (0 = embeddings, `i` = block `i`, the last
            index = after the final norm).
        last_only: Keep only the last position of each forward (`[batch, hidden]`, for decoding); False keeps the
            whole sequence (`[batch, seq, hidden]`, for teacher-forced feature extraction).
        device: Where `features()` concatenates the layers; None uses the first captured layer's device.

    Raises:
        LynxConfigError: If `layers` is empty or an index is out of range for the model.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2)).eval()
        >>> with HiddenStateCapture(model, layers=(1, 2)) as capture:
        ...     _ = model(torch.tensor([[1, 2, 3]]))
        ...     capture.features().shape
        torch.Size([1, 32])
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], last_only: bool = True, device: torch.device | str | None = None):
        self.layers = tuple(int(i) for i in layers)
        if not self.layers:
            raise LynxConfigError("HiddenStateCapture needs at least one layer index.")
        self.last_only = last_only
        self.device = torch.device(device) if device is not None else None
        self._states: list[torch.Tensor | None] = [None] * len(self.layers)
        self._thread = threading.get_ident()  # only this thread's forwards are captured
        self._handles = [
            module.register_forward_hook(self._make_hook(slot))
            for slot, module in enumerate(layer_modules(model, self.layers))
        ]

    def _make_hook(self, slot: int):
        def hook(module: nn.Module, args, output) -> None:
            if threading.get_ident() != self._thread:  # another thread's forward of the same model (e.g. generating)
                return
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            self._states[slot] = hidden[:, -1] if self.last_only else hidden

        return hook

    def features(self) -> torch.Tensor:
        """The captured layers concatenated on the last dimension.

        Returns:
            A tensor of `[batch, sum(hidden)]` when `last_only`, else `[batch, seq, sum(hidden)]`, on `device`.

        Raises:
            RuntimeError: If no forward pass has run since the capture was made or cleared.

        Example:
            >>> import torch
            >>> from transformers import LlamaConfig, LlamaForCausalLM
            >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
            ...     num_hidden_layers=2, num_attention_heads=2))
            >>> with HiddenStateCapture(model, layers=(0, 2), last_only=False) as capture:
            ...     _ = model(torch.tensor([[1, 2, 3]]))
            ...     capture.features().shape
            torch.Size([1, 3, 32])
        """
        if any(state is None for state in self._states):
            raise RuntimeError("No hidden states captured yet: run a forward pass of the model first.")
        device = self.device or self._states[0].device
        return torch.cat([state.to(device) for state in self._states], dim=-1)

    def clear(self) -> None:
        """Forget the last captured states (the hooks stay registered).

        Example:
            >>> import torch
            >>> from transformers import LlamaConfig, LlamaForCausalLM
            >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
            ...     num_hidden_layers=2, num_attention_heads=2))
            >>> capture = HiddenStateCapture(model, layers=(1,))
            >>> _ = model(torch.tensor([[1, 2]]))
            >>> capture.clear()
            >>> capture.features()
            Traceback (most recent call last):
            ...
            RuntimeError: No hidden states captured yet: run a forward pass of the model first.
            >>> capture.remove()
        """
        self._states = [None] * len(self.layers)

    def remove(self) -> None:
        """Remove the hooks from the model and forget the captured states; leaving a `with` block does this.

        Example:
            >>> import torch
            >>> from transformers import LlamaConfig, LlamaForCausalLM
            >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
            ...     num_hidden_layers=2, num_attention_heads=2))
            >>> capture = HiddenStateCapture(model, layers=(1,))
            >>> capture.remove()
            >>> sum(len(block._forward_hooks) for block in decoder_blocks(model))
            0
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> "HiddenStateCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

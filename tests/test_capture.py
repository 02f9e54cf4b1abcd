"""Hidden-state capture: hooks reproduce `output_hidden_states`, keep only the last position while decoding."""

import pytest
import torch

from conftest import tiny_llama, tiny_qwen2
from lynx_hf.runtime.capture import HiddenStateCapture, default_layers, layer_modules
from lynx_hf.errors import LynxConfigError


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_hooks_equal_output_hidden_states_for_every_index(make):
    model = make(num_hidden_layers=3)
    ids = torch.randint(3, 60, (2, 9))
    reference = model(ids, output_hidden_states=True).hidden_states
    with HiddenStateCapture(model, layers=(0, 1, 2, 3), last_only=False) as capture:
        model(ids)
        features = capture.features()
    expected = torch.cat([reference[i] for i in (0, 1, 2, 3)], dim=-1)
    assert torch.equal(features, expected)


def test_decoding_capture_equals_output_hidden_states_at_every_generated_position():
    model = tiny_llama(num_hidden_layers=3)
    prompt = torch.randint(3, 60, (2, 5))
    layers = (1, 3)
    per_step = []

    class Recorder:
        def __init__(self, capture):
            self.capture = capture

        def __call__(self, input_ids, scores, **kwargs):
            # stopping-criteria timing: the last forward processed input_ids[:, -2]
            per_step.append((input_ids.shape[1] - 2, self.capture.features().clone()))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    with HiddenStateCapture(model, layers=layers) as capture:
        out = model.generate(prompt, stopping_criteria=[Recorder(capture)], max_new_tokens=8, do_sample=False,
                             min_new_tokens=8)
    reference = model(out, output_hidden_states=True).hidden_states
    for position, features in per_step:
        expected = torch.cat([reference[i][:, position] for i in layers], dim=-1)
        torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    assert len(per_step) == 8


def test_remove_detaches_the_hooks():
    model = tiny_llama()
    capture = HiddenStateCapture(model, layers=(1,))
    capture.remove()
    model(torch.tensor([[3, 4]]))
    with pytest.raises(RuntimeError, match="forward pass"):
        capture.features()


def test_layer_index_out_of_range_is_a_clear_error():
    with pytest.raises(LynxConfigError, match="0..2"):
        layer_modules(tiny_llama(), [3])


def test_default_layers_follow_the_reference_fractions():
    assert default_layers(tiny_llama(num_hidden_layers=28)) == (9, 14, 21, 28)

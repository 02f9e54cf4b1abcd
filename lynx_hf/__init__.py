"""lynx-hf: early exit for reasoning models at reflection cues, with a conformal guarantee."""

"""What runs inside `model.generate`: the `Lynx` bundle, its plug-ins and per-call monitor, the cue detector,
hidden-state capture, the forced-exit construction, thinking formats, the probe, the conformal thresholds and
the live audit. Imports nothing from `lynx_hf.pipeline` or `lynx_hf.evaluation` (ARCHITECTURE.md)."""

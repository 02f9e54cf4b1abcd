"""What measures exits: replay and live evaluation, every baseline, the demo, plots and realised rates over
random splits. Imports `lynx_hf.runtime` and `lynx_hf.pipeline`; nothing imports it but the CLI."""

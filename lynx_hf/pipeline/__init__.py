"""What builds a bundle offline: collect traces and forced-exit labels -> event tables -> train the probe ->
calibrate -> build and push. Imports `lynx_hf.runtime` (the shared parts), never `lynx_hf.evaluation`."""

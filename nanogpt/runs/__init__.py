"""One run: the checks before its dir exists (preflight), which dir and config it runs with
(resume, runlock), and what it leaves and reads back: checkpoints, weights to start from,
provenance, metrics, RNG state, signals, start-up times, failures (and nanoGPT's own runs).
May import data/ and parallel/; never sweeps/ or an entrypoint (never the training loop).
"""

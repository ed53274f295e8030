"""One run: the checks before its dir exists (preflight), which dir and config it runs with
(resume, runlock), and what it leaves and reads back: checkpoints, weights to start from,
budgets (tokens, FLOPs, time) and time to target, provenance, metrics, RNG state, signals, start-up times, failures, and nanoGPT's own runs.
Imports data/ and parallel/, never the training loop or another entrypoint; sweeps/ and the entrypoints import it.
"""

"""Many runs: the jobs of a sweep, planned, checked, run and summed up (launcher, called by the
Hydra plugins in hydra_plugins/nanogpt_launchers/), a sweep's report (nanogpt-report) and
alternating comparisons (nanogpt-compare). Imports runs/, parallel/ and data/; it starts a training
as a process (nanogpt-train), never by importing an entrypoint. Only the plugins and entrypoints import it.
"""

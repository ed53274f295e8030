"""Many runs: how the jobs of a sweep are planned, checked, run and summed up (launcher, behind
the Hydra plugins in hydra_plugins/nanogpt_launchers/), the report of a sweep (nanogpt-report)
and alternating comparisons (nanogpt-compare). May import runs/, parallel/ and data/; runs a
training only as a process (nanogpt-train), never by importing an entrypoint.
"""

"""nanogpt: nanoGPT for research groups, driven by composable Hydra configs.

Kept free of imports: the entrypoints must start fast (`nanogpt-train --cfg job` never loads torch).
"""

__version__ = "0.1.0"

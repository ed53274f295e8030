"""nanogpt's sweep launchers, where Hydra looks for plugins; their logic is nanogpt/sweeps/launcher.py."""

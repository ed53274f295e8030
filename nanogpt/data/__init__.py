"""Data: a dataset made into token files (datasets), the tokenizers that read and write them,
the batches training draws from them (batches), and the one checked reader of every file a user
names (userfiles). Imports only config.py and errors.py; runs/, sweeps/ and the entrypoints import it.
It never imports the training loop or any entrypoint.
"""

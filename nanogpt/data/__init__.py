"""Data: a dataset made into token files (datasets), the tokenizers that read and write them,
and the batches training draws from them (batches); every file a user names is read through
userfiles. Imports only config and errors: data never imports runs/, parallel/, sweeps/ or an entrypoint.
"""

"""Processes and devices: which rank this is and the process group (distributed), the device and
dtype the hardware group means (hardware), whether a step fits in memory (memory), the largest
micro-batch that does (autobatch, which is handed the training step), how the model is spread
over ranks (sharding: DDP, FSDP2), and how the workers of one run start (launch, which is handed
the training loop). Imports only config.py and errors.py; runs/, sweeps/ and the entrypoints import it.
"""

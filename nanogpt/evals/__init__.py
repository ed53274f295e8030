"""Downstream evaluation: our GPT as a language model of EleutherAI's lm-evaluation-harness
(lm.py), its tasks and results (harness.py), and the tasks run during training (in_training.py).
Imports the foundation, the model and data/ (tokenizers); lm_eval is an optional extra,
imported only where it is used."""

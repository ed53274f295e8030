"""nanogpt-prepare: tokenize a dataset into data.dir ahead of training.

    nanogpt-prepare data=shakespeare data.source=/path/input.txt
    nanogpt-prepare data=openwebtext data.num_threads=16
    nanogpt-prepare data=text data.source='notes/*.md' force=true

Only Hydra and the config schema are imported at start: numpy, tiktoken and datasets load once
the task runs, so --help and --cfg job answer at once.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from nanogpt.cli import hydra_entrypoint
from nanogpt.config import PrepareConfig, config_dir, to_object
from nanogpt.errors import user_errors


@hydra.main(config_path=str(config_dir()), config_name="prepare", version_base="1.3")
def _prepare(cfg: DictConfig) -> None:
    from pathlib import Path

    from nanogpt.data.datasets import is_prepared, prepare

    with user_errors():
        config: PrepareConfig = to_object(cfg)
        data = config.data
        existed = is_prepared(data.dir) and not config.force
        meta = prepare(data, force=config.force)
    out = Path(data.dir)
    if existed:  # a fresh prepare has already logged its one-line summary
        print(f"{data.name}: already prepared in {out} (force=true prepares it again)")
    print(f"  vocab {meta['vocab_size']:,} ({meta['encoding']}), {meta['dtype']} tokens")
    print(f"  train {meta['train_tokens']:,} tokens: {out / 'train.bin'}")
    print(f"  val   {meta['val_tokens']:,} tokens: {out / 'val.bin'}")


main = hydra_entrypoint(_prepare)

if __name__ == "__main__":
    main()

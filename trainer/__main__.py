"""Hydra entry point: ``python -m trainer +experiment=sparse_mlp [overrides]``."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from trainer.config import register  # noqa: E402

register()


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from trainer.run import run

    run(cfg)


if __name__ == "__main__":
    main()

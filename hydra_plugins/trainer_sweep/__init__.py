"""The trainer's Hydra plugins: a launcher and an Optuna sweeper that record a failed job and go on.

Hydra instantiates only plugins defined inside the ``hydra_plugins`` namespace
package, so the classes live here; their configs are
``configs/hydra/launcher/processes.yaml`` and
``configs/hydra/sweeper/optuna_safe.yaml``. Nothing here imports TensorFlow.
"""

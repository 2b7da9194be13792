"""`python -m pregated_jax.train`: runs `pregated_jax.cli.train.main` (see that module for the flags)."""

from pregated_jax.cli.train import main

if __name__ == "__main__":
    main()

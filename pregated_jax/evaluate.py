"""`python -m pregated_jax.evaluate`: runs `pregated_jax.cli.evaluate.main` (see that module for the flags)."""

from pregated_jax.cli.evaluate import main

if __name__ == "__main__":
    main()

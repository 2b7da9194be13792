"""`python -m pregated_jax.infer`: runs `pregated_jax.cli.infer.main` (see that module for the flags)."""

from pregated_jax.cli.infer import main

if __name__ == "__main__":
    main()

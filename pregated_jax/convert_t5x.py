"""`python -m pregated_jax.convert_t5x`: runs `pregated_jax.cli.convert_t5x.main` (see that module for the flags)."""

from pregated_jax.cli.convert_t5x import main

if __name__ == "__main__":
    main()

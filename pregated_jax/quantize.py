"""`python -m pregated_jax.quantize`: runs `pregated_jax.cli.quantize.main` (see that module for the flags)."""

from pregated_jax.cli.quantize import main

if __name__ == "__main__":
    main()

"""`python -m pregated_jax.benchmark`: runs `pregated_jax.cli.benchmark.main` (see that module for the flags)."""

from pregated_jax.cli.benchmark import main

if __name__ == "__main__":
    main()

"""`python -m pregated_jax.export_hf`: runs `pregated_jax.cli.export_hf.main` (see that module for the flags)."""

from pregated_jax.cli.export_hf import main

if __name__ == "__main__":
    main()

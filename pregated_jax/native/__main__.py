import sys

from pregated_jax.native import main

sys.exit(main())

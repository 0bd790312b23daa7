"""``python -m pagkit.cli`` (and ``torchrun -m pagkit.cli``): the pagkit command."""
import sys

from . import main

sys.exit(main())

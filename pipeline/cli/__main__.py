"""`python -m pipeline.cli <verb>`: how torchrun and torchx start the ranks."""

import sys

from pipeline.cli import main

sys.exit(main())

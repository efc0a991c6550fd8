"""`python -m hyrank.pipeline.cli <verb>`: how torchrun and torchx start the ranks."""

import sys

from hyrank.pipeline.cli import main

sys.exit(main())

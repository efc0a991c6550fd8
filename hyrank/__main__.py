"""`python -m hyrank <verb>`: the same as the `hyrank` command."""

import sys

from hyrank.pipeline.cli import main

sys.exit(main())

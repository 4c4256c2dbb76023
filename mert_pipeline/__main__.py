"""`python -m mert_pipeline` is `mert-pipe`."""

from mert_pipeline.cli import main

main()

"""`python -m paragen …` (also under `torchrun -m paragen …`)."""
import sys

from paragen.launch.cli import main

sys.exit(main())

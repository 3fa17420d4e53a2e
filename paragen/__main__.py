"""`python -m paragen …` (also under `torchrun -m paragen …`)."""
from paragen.launch.cli import run

run()

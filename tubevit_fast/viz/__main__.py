import sys

from tubevit_fast.cli import run
from tubevit_fast.viz import main

sys.exit(run(main))

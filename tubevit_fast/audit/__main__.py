import sys

from tubevit_fast.audit.report import main

sys.exit(main())

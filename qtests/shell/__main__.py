import sys

from qtests.shell.cli import main

sys.exit(main())

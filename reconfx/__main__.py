import sys

from reconfx.cli import main

sys.exit(main())

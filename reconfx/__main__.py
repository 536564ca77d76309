import sys

from reconfx.console import main

sys.exit(main())

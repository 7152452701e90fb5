import sys

from safe.cli import main

sys.exit(main())

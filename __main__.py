import sys

from dsv3c.cli.main import main

sys.exit(main())

import sys

from lazymount.cli.main import main

sys.exit(main())

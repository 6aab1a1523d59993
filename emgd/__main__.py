import sys

from emgd.cli import main

sys.exit(main())

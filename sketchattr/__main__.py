import sys

from sketchattr.cli import main

sys.exit(main())
